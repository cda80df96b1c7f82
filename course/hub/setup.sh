#!/usr/bin/env bash
# Install everything the course hub needs, idempotently.  Run as root (make hub does):
#
#   course/hub/setup.sh [--users] [--course]
#
#   * Debian's python3-venv (and nodejs/npm when they are missing);
#   * the hub's virtual environment, made from Debian's /usr/bin/python3 so that every
#     user's server can read it (a venv made from root's pyenv cannot), with JupyterHub,
#     JupyterLab, nbgrader and the course's dependencies (torch pinned to 2.13.0), but not the
#     course package itself: everyone reads this venv, and the grading sandbox mounts it;
#   * students' library <prefix>/student/lib (students' PYTHONPATH): llmopt's support modules
#     and the references of the labs in course/hub/published.txt, check() of the autograder
#     (course/hub/student_lib.py); rerun this script after editing published.txt;
#   * the grader's course copy <prefix>/course and the root grading helper (root-only);
#   * the per-role Jupyter configuration (course/hub/config/{instructor,student});
#   * configurable-http-proxy from the npm registry into .hub/npm (ignored by git);
#   * this checkout (it holds solutions/ and the hub's state) closed to other users (o-rwx);
#   * --users: the demo users (Unix accounts: instructor, student1, student2; homes mode 700),
#     the exchange (/srv/nbgrader/exchange, mode 1777, with the course's folders made for the
#     instructor: course/hub/make-exchange.sh) and the instructor's course copy in
#     ~instructor/llm-optimization-labs (created once, never overwritten: it holds the
#     gradebook).
#
# Environment: LLMOPT_HUB_PREFIX (default /opt/llmopt-hub: venv/ and etc/ live there),
# LLMOPT_HUB_EXCHANGE (default /srv/nbgrader/exchange).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PREFIX=${LLMOPT_HUB_PREFIX:-/opt/llmopt-hub}
VENV=$PREFIX/venv
EXCHANGE=${LLMOPT_HUB_EXCHANGE:-/srv/nbgrader/exchange}
STATE=$REPO/.hub
JUPYTERHUB_VERSION=6.1.1
CHP_VERSION=5.3.0
DEMO_INSTRUCTORS=(instructor)
DEMO_STUDENTS=(student1 student2)

want_users=0; want_course=0
for arg in "$@"; do
  case $arg in
    --users) want_users=1 ;;
    --course) want_course=1 ;;
    *) echo "usage: $0 [--users] [--course]" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" != 0 ]; then echo "course/hub/setup.sh: run as root (the hub spawns servers as other users)" >&2; exit 1; fi
log() { printf '[hub setup] %s\n' "$*"; }

# --- Debian packages -------------------------------------------------------------------
missing=()
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v npm >/dev/null || missing+=(nodejs npm)
command -v useradd >/dev/null || missing+=(passwd)
command -v sudo >/dev/null || missing+=(sudo)
command -v bwrap >/dev/null || missing+=(bubblewrap)  # the autograder's sandbox
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- the hub's venv (Debian's python3) ---------------------------------------------------
# The course package is installed for its dependencies only, from a scratch copy (so that the
# repository gets no build/ folder), then uninstalled: the venv is every user's and the
# grading sandbox's, and llmopt in it would hand out every reference implementation.
course_copy() {
  scratch=$(mktemp -d)
  cp -r "$REPO/lib" "$REPO/autograder" "$REPO/pyproject.toml" "$REPO/README.md" "$scratch/"
  find "$scratch" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
  echo "$scratch"
}
pip_quiet() {  # pip's and setuptools' chatter goes to a log; shown only when pip fails
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$STATE/pip.log" 2>&1 \
    || { cat "$STATE/pip.log" >&2; return 1; }
}
mkdir -p "$STATE"
deps_key=$( (echo "jupyterhub==$JUPYTERHUB_VERSION"; cat "$REPO/pyproject.toml") | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.deps" 2>/dev/null)" != "$deps_key" ]; then
  log "creating $VENV from /usr/bin/python3 (jupyterhub $JUPYTERHUB_VERSION and the course's pinned packages)"
  mkdir -p "$PREFIX"
  [ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
  src=$(course_copy)
  # torch pinned in the same command: unpinned, pip would take a multi-GB CUDA build.
  pip_quiet torch==2.13.0 "jupyterhub==$JUPYTERHUB_VERSION" "$src"
  rm -rf "$src"
  echo "$deps_key" > "$VENV/.deps"
fi
# No course package in the venv (also removes the one an earlier setup installed).
if "$VENV/bin/python" -m pip show -q llm-optimization-labs >/dev/null 2>&1; then
  log "removing the course package (llmopt, autograder) from $VENV: students get student/lib"
  "$VENV/bin/python" -m pip uninstall -y -q llm-optimization-labs >"$STATE/pip.log" 2>&1
fi
for sp in "$VENV"/lib/python3*/site-packages; do
  rm -rf "$sp/llmopt" "$sp/autograder" "$sp"/llm_optimization_labs-*
done
rm -f "$VENV/.course"

# --- what students may import: <prefix>/student/lib ----------------------------------------
mkdir -p "$PREFIX/student"
"$VENV/bin/python" "$REPO/course/hub/student_lib.py" "$PREFIX/student/lib" \
  --published "${LLMOPT_HUB_PUBLISHED:-$REPO/course/hub/published.txt}" | sed 's/^/[hub setup] /'

# --- Jupyter configuration: one folder per role, chosen by the hub (JUPYTER_CONFIG_PATH) ---
mkdir -p "$PREFIX/etc"
rm -rf "$PREFIX/etc.new" && cp -r "$REPO/course/hub/config" "$PREFIX/etc.new"
rm -rf "$PREFIX/etc" && mv "$PREFIX/etc.new" "$PREFIX/etc"
chmod 755 "$PREFIX"
chmod -R a+rX "$PREFIX/venv" "$PREFIX/etc" "$PREFIX/student"
# Everyone: no "news" toast, no update check (the hub has no internet anyway).
mkdir -p "$VENV/share/jupyter/lab/settings"
cat > "$VENV/share/jupyter/lab/settings/overrides.json" <<'JSON'
{
  "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}
}
JSON

# --- grading on the hub: the sandboxed grader runs as root through one sudo rule -----------
# <prefix>/course is the course as the administrator installed it (root's, mode 700: it holds
# solutions/ and the hidden checks): the code that runs as root. <prefix>/grading (mode 700)
# holds the helper's private grading folders. Instructors (Unix group llmopt-instructors) may
# run only the helper.
rm -rf "$PREFIX/course.new" && mkdir -m 700 "$PREFIX/course.new"
cp -r "$REPO/autograder" "$REPO/lib" "$REPO/solutions" "$REPO/labs" "$PREFIX/course.new/"
find "$PREFIX/course.new" \( -name __pycache__ -o -name '*.egg-info' -o -name tests \) -prune -exec rm -rf {} +
rm -rf "$PREFIX/course" && mv "$PREFIX/course.new" "$PREFIX/course"
mkdir -p "$PREFIX/bin" "$PREFIX/grading"
find "$PREFIX/grading" -mindepth 1 -maxdepth 1 -mmin +1440 -exec rm -rf {} +  # crashed runs
{ echo "#!$VENV/bin/python -I"; cat "$REPO/course/hub/grade_submission.py"; } > "$PREFIX/bin/llmopt-grade-submission"
chown -R root:root "$PREFIX/course" "$PREFIX/bin" "$PREFIX/grading"
chmod 700 "$PREFIX/course" "$PREFIX/grading"
chmod 755 "$PREFIX/bin" "$PREFIX/bin/llmopt-grade-submission"
getent group llmopt-instructors >/dev/null || groupadd llmopt-instructors
sudoers=$(mktemp)
echo "%llmopt-instructors ALL=(root) NOPASSWD: $PREFIX/bin/llmopt-grade-submission" > "$sudoers"
visudo -cqf "$sudoers" && install -m 440 "$sudoers" /etc/sudoers.d/llmopt-hub
rm -f "$sudoers"

# --- the proxy: configurable-http-proxy from npm, in an ignored folder of the repo ------
if [ ! -x "$STATE/npm/node_modules/.bin/configurable-http-proxy" ] || \
   ! grep -q "\"version\": \"$CHP_VERSION\"" "$STATE/npm/node_modules/configurable-http-proxy/package.json" 2>/dev/null; then
  log "npm install configurable-http-proxy@$CHP_VERSION into $STATE/npm"
  mkdir -p "$STATE/npm"
  npm install --silent --no-audit --no-fund --prefix "$STATE/npm" "configurable-http-proxy@$CHP_VERSION" >/dev/null 2>&1 \
    || npm install --no-audit --no-fund --prefix "$STATE/npm" "configurable-http-proxy@$CHP_VERSION"
fi

# --- this checkout: it holds solutions/, the checks and the hub's state (.hub) ------------
# Users' servers need nothing from it (they run <prefix>/venv with <prefix>/etc).
chmod o-rwx "$REPO"
chmod 700 "$STATE"

# --- demo users, the exchange and the instructor's course copy ---------------------------
make_user() {
  id -u "$1" >/dev/null 2>&1 || useradd -m -s /bin/bash "$1"
  chmod 700 "$(getent passwd "$1" | cut -d: -f6)"
}
if [ $want_users = 1 ]; then
  for u in "${DEMO_INSTRUCTORS[@]}" "${DEMO_STUDENTS[@]}"; do make_user "$u"; done
  for u in "${DEMO_INSTRUCTORS[@]}"; do usermod -aG llmopt-instructors "$u"; done
  bash "$REPO/course/hub/make-exchange.sh" "$EXCHANGE" "${DEMO_INSTRUCTORS[0]}"
  want_course=1
fi
if [ $want_course = 1 ]; then
  home=$(getent passwd "${DEMO_INSTRUCTORS[0]}" | cut -d: -f6)
  if [ ! -d "$home/llm-optimization-labs" ]; then
    log "copying the course into $home/llm-optimization-labs (the instructor's course root)"
    bash "$REPO/course/hub/copy-course.sh" "$home/llm-optimization-labs" "${DEMO_INSTRUCTORS[0]}"
  fi
fi
log "ready: $VENV, $STATE/npm, exchange $EXCHANGE"
