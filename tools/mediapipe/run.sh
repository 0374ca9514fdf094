#!/usr/bin/env bash
# MediaPipe Face Mesh against the head prior's landmarks (issue #15).
#
#   tools/mediapipe/run.sh measure [OUT] [--fixture FILE]
#       renders the anny prior for the cameras and expressions of `avatar prior show --control`,
#       runs MediaPipe on the renders and reports per view how far its landmarks and contour
#       drawings are from the control images avatar gives the ControlNet (OUT/report.json;
#       default OUT: outputs/mediapipe-measure). Exit status 1 if the goal is missed.
#       --fixture tests/data/mediapipe_anny_detections.json refreshes the test fixture.
#   tools/mediapipe/run.sh embed [--work DIR] [--reuse]
#       re-derives avatar/prior/data/anny_landmarks.json from MediaPipe (a few minutes).
#
# MediaPipe 0.10.21 (its legacy Face Mesh, whose models ship in the wheel) needs numpy < 2,
# so it gets its own virtual environment, made on first use from requirements.txt in
# ${AVATAR_MEDIAPIPE_VENV:-~/.cache/avatar/mediapipe-venv} with ${MEDIAPIPE_BASE_PYTHON:-python3}
# (Python 3.9-3.12). avatar itself runs with ${PYTHON:-python}, the environment avatar is installed in.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
py="${PYTHON:-python}"
venv="${AVATAR_MEDIAPIPE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/avatar/mediapipe-venv}"

if ! "$venv/bin/python" -c "import mediapipe" >/dev/null 2>&1; then
    echo "making the MediaPipe environment in $venv" >&2
    "${MEDIAPIPE_BASE_PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r "$here/requirements.txt"
fi

cd "$repo"
command="${1:-measure}"
shift || true
case "$command" in
    measure)
        out="outputs/mediapipe-measure"
        if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then out="$1"; shift; fi
        rm -rf "$out/control" "$out/mediapipe"
        "$py" "$here/measure.py" render "$out"
        "$venv/bin/python" "$here/detect.py" --out "$out/detections.json" --draw "$out/mediapipe" \
            "$out"/control/*_render.png >/dev/null 2>"$out/detect.log" || { cat "$out/detect.log" >&2; exit 1; }
        "$py" "$here/measure.py" report "$out" "$@"
        ;;
    embed)
        "$py" -m avatar.prior.data.make_anny_landmarks --mediapipe-python "$venv/bin/python" "$@"
        ;;
    *)
        echo "usage: $0 measure [OUT] [--fixture FILE] | embed [--work DIR] [--reuse]" >&2
        exit 2
        ;;
esac
