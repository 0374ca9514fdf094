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
#   tools/mediapipe/run.sh export [OUT] [--glb FILE]
#       what MediaPipe reads from an `avatar export --topology prior` GLB against the anny prior itself
#       (issue #18; export_check.py): without --glb, first makes a fast fine-only run from the prior and
#       exports it (OUT/run). Writes OUT/report.md and OUT/report.json (default OUT:
#       outputs/mediapipe-export). Exit status 1 if an expression's change differs by more than 20%.
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
    export)
        out="outputs/mediapipe-export"
        if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then out="$1"; shift; fi
        glb=""
        if [ "${1:-}" = "--glb" ]; then glb="$2"; shift 2; fi
        mkdir -p "$out"
        avatar=("$py" -c "import sys; from avatar.cli import main; sys.argv[0] = 'avatar'; sys.exit(main())")
        if [ -z "$glb" ]; then
            rm -rf "$out/run"
            AVATAR_OUTPUTS="$out" "${avatar[@]}" generate "a head" --preset smoke --guidance tiny \
                --set coarse.steps=0 --set fine.steps=2 --set fine.dmtet_resolution=96 --out "$out/run" >&2
            run="$(ls -d "$out"/run/*/ | head -n 1)"
            AVATAR_OUTPUTS="$out" "${avatar[@]}" export "$run" --topology prior --texture-size 1024 >&2
            glb="${run%/}/export/avatar.glb"
        fi
        rm -rf "$out/renders"
        "$py" "$here/export_check.py" render "$out" --glb "$glb"
        "$venv/bin/python" "$here/detect.py" --out "$out/detections.json" "$out"/renders/*.png \
            >/dev/null 2>"$out/detect.log" || { cat "$out/detect.log" >&2; exit 1; }
        "$py" "$here/export_check.py" report "$out"
        ;;
    embed)
        "$py" -m avatar.prior.data.make_anny_landmarks --mediapipe-python "$venv/bin/python" "$@"
        ;;
    *)
        echo "usage: $0 measure [OUT] [--fixture FILE] | export [OUT] [--glb FILE] | embed [--work DIR] [--reuse]" >&2
        exit 2
        ;;
esac
