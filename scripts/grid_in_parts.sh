#!/usr/bin/env bash
# Run a grid one run at a time on a machine that may be replaced at any moment: after
# each run finishes, certify it, export the small result files of every finished run to
# DEST (a folder under docs/results/) and commit DEST, so nothing finished is lost.
#
#   scripts/grid_in_parts.sh GRID RESULTS_DIR DEST [CERTIFY_ARGS...]
#
# GRID is a preset name or .toml file; RESULTS_DIR holds the run folders (checkpoints
# included; not committed); CERTIFY_ARGS are passed to `python -m experiments certify`
# for every finished run (e.g. --sigma 0.25 --n 1000 --test-subset 300); without them
# nothing is certified. PYTHON (default python) and MOMENTKIT_DATA are read from the
# environment. Re-running the script resumes: finished runs and certified images are
# not redone. It stops when every run of the grid is finished or has failed.
set -euo pipefail
grid=$1 results=$2 dest=$3
shift 3
certify_args=("$@")
py=${PYTHON:-python}

commit() {
    "$py" -m experiments grid export "$results" "$dest" --no-progress
    git add -- "$dest"
    if ! git diff --cached --quiet -- "$dest"; then
        git commit -q -m "$1" -- "$dest"
    fi
}

finished() {
    local n=0 f
    for f in "$results"/runs/*/results.json; do
        if [ -f "$f" ]; then n=$((n + 1)); fi
    done
    echo "$n"
}

certify_finished() {
    [ ${#certify_args[@]} -eq 0 ] && return 0
    for run in "$results"/runs/*/; do
        [ -f "$run/results.json" ] || continue
        "$py" -m experiments certify --run "$run" --no-progress "${certify_args[@]}" \
            || echo "certify $run exited with $?"
    done
}

while true; do
    before=$(finished)
    "$py" -m experiments grid run "$grid" --results-dir "$results" --limit 1 --no-progress \
        || echo "grid run exited with $? (see grid status)"
    after=$(finished)
    certify_finished
    commit "docs/results: $grid, $after finished runs exported (scripts/grid_in_parts.sh)"
    if [ "$after" -eq "$before" ]; then
        break  # nothing left that can run (all done, or the rest failed: see grid status)
    fi
done
"$py" -m experiments grid status "$grid" --results-dir "$results"
