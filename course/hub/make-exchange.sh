#!/usr/bin/env bash
# nbgrader's exchange for the hub, with the course's folders made in advance (run as root):
#
#   make-exchange.sh EXCHANGE INSTRUCTOR [COURSE_ID]
#
#   EXCHANGE                   root:root 1777  everyone may create an entry; the sticky bit
#                                              stops anyone renaming or deleting another's
#   EXCHANGE/COURSE_ID         INSTRUCTOR 0755 made now, so that no student can take the name
#     outbound/                INSTRUCTOR 0755 releases: students read, never write
#     inbound/                 INSTRUCTOR 3733 submissions: students create their own entry but
#                                              cannot list the folder (setgid: the instructor's
#                                              group) nor rename or delete another's (sticky)
#     feedback/                INSTRUCTOR 0711 feedback files under unguessable names
#
# These are the modes nbgrader's own release and release_feedback create (see
# nbgrader/exchange/default/release_assignment.py), plus the sticky bits. Idempotent; refuses
# a course folder that belongs to someone other than INSTRUCTOR (a squatter).
set -euo pipefail
exchange=$1; owner=$2; course=${3:-llm-optimization-labs}
if [ "$(id -u)" != 0 ]; then echo "make-exchange.sh: run as root" >&2; exit 1; fi
group=$(id -gn "$owner")
mkdir -p "$exchange"
if [ -L "$exchange" ]; then echo "make-exchange.sh: $exchange is a symlink" >&2; exit 1; fi
chown root:root "$exchange"
chmod 1777 "$exchange"
make_dir() {  # path mode
  if [ -L "$1" ] || { [ -e "$1" ] && [ ! -d "$1" ]; }; then
    echo "make-exchange.sh: $1 is not a folder (a symlink or a file): remove it" >&2; exit 1
  fi
  if [ -d "$1" ] && [ "$(stat -c %U "$1")" != "$owner" ]; then
    echo "make-exchange.sh: $1 belongs to $(stat -c %U "$1"), not $owner: remove it (a squatter?)" >&2
    exit 1
  fi
  mkdir -p "$1"
  chown "$owner:$group" "$1"
  chmod "$2" "$1"
}
make_dir "$exchange/$course" 0755
make_dir "$exchange/$course/outbound" 0755
make_dir "$exchange/$course/inbound" 3733
make_dir "$exchange/$course/feedback" 0711
