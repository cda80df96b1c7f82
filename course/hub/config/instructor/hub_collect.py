"""nbgrader's collect on the hub, refusing what a student may plant in the inbound folder.

The inbound folder (``<exchange>/<course>/inbound``, mode 3733) lets every student create an
entry, named ``<student>+<assignment>+<timestamp>[+<random>]`` by nbgrader's submit. The
default collector trusts that name and follows symlinks as the instructor: a student could
leave a symlink (to a file only the instructor can read, such as the solution notebook, or to
another student's submission) and have it collected as its own submission, or submit in another
student's name; nbgrader only warns when the owner differs.

``SafeExchangeCollect`` (``c.ExchangeFactory.collect = "hub_collect.SafeExchangeCollect"`` in
this folder's ``nbgrader_config.py``):

* refuses (logs an error, skips) an entry that is a symlink or not a folder, whose owner is not
  the Unix user it names, or whose name does not parse, before picking each student's latest
  submission, so a forged entry can neither be collected nor hide the real one;
* copies a submission without following any symlink: the folder is opened with ``O_NOFOLLOW``
  and walked by file descriptor; symlinks, devices, FIFOs and files the student does not own
  (hard links to someone else's file) are skipped with a warning; nbgrader's ``ignore``,
  ``include``, ``max_file_size`` and ``max_dir_size`` still apply.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import pwd
import re
import stat

from nbgrader.api import Gradebook, MissingEntry
from nbgrader.exchange.default.collect import ExchangeCollect, groupby
from nbgrader.utils import check_mode, parse_utc

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MAX_DEPTH = 32


class SubmissionRefused(Exception):
    pass


class SafeExchangeCollect(ExchangeCollect):
    """``ExchangeCollect`` that collects only what the named student owns, never via a symlink."""

    def _refusal(self, path: str, username: str) -> str | None:
        """Why the inbound entry ``path`` cannot be ``username``'s submission (None: it can)."""
        if not NAME.match(username):
            return f"{username!r} is not a valid student name"
        try:
            st = os.lstat(path)
        except OSError as exc:
            return f"cannot stat it ({exc.strerror})"
        if stat.S_ISLNK(st.st_mode):
            return "it is a symlink"
        if not stat.S_ISDIR(st.st_mode):
            return "it is not a folder"
        try:
            uid = pwd.getpwnam(username).pw_uid
        except KeyError:
            return f"there is no Unix user {username!r}"
        if st.st_uid != uid:
            try:
                owner = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                owner = f"uid {st.st_uid}"
            return f"it claims to be {username}'s but belongs to {owner}"
        return None

    def init_src(self):
        if self.coursedir.course_id == '':
            self.fail("No course id specified. Re-run with --course flag.")
        self.course_path = os.path.join(self.root, self.coursedir.course_id)
        self.inbound_path = os.path.join(self.course_path, 'inbound')
        if not os.path.isdir(self.inbound_path):
            self.fail("Course not found: {}".format(self.inbound_path))
        if not check_mode(self.inbound_path, read=True, execute=True):
            self.fail("You don't have read permissions for the directory: {}".format(self.inbound_path))
        student_id = self.coursedir.student_id if self.coursedir.student_id else '*'
        pattern = os.path.join(self.inbound_path, '{}+{}+*'.format(
            glob.escape(student_id) if student_id != '*' else '*', glob.escape(self.coursedir.assignment_id)))
        records = []
        for path in sorted(glob.glob(pattern)):
            filename = os.path.basename(path)
            parts = filename.rsplit('+', 3)
            try:
                if len(parts) < 3:
                    raise ValueError("not <student>+<assignment>+<timestamp>")
                record = {'username': parts[0], 'filename': filename, 'timestamp': parse_utc(parts[2])}
            except Exception as exc:  # dateutil raises several kinds
                self.log.error("Refusing %s: its name does not parse (%s)", path, exc)
                continue
            if parts[1] != self.coursedir.assignment_id:
                continue  # a student name with '+' matched the glob: not this assignment
            why = self._refusal(path, record['username'])
            if why:
                self.log.error("Refusing %s: %s (not collected; cheating attempt?)", path, why)
                continue
            records.append(record)
        usergroups = groupby(records, lambda item: item['username'])
        with Gradebook(self.coursedir.db_url, self.coursedir.course_id) as gb:
            try:
                self.duedate = gb.find_assignment(self.coursedir.assignment_id).duedate
            except MissingEntry:
                self.duedate = None
        if self.duedate is None or not self.before_duedate:
            self.src_records = [self._sort_by_timestamp(v)[0] for v in usergroups.values()]
        else:
            self.src_records = []
            for v in usergroups.values():
                recs = self._sort_by_timestamp(v)
                before = [r for r in recs if r['timestamp'] <= self.duedate]
                self.src_records.append(before[0] if before else recs[0])

    def do_copy(self, src, dest, log=None):
        """Copy the submission ``src`` to ``dest`` (which must not exist) through file descriptors.

        A submission that cannot be copied safely (it changed into a symlink meanwhile, is
        too big, ...) is logged and left out; the other students' are still collected.
        """
        try:
            self._safe_copy(src, dest)
        except Exception as exc:
            self.log.error("Refusing %s: %s (not collected)", src, exc)
            if os.path.lexists(dest) and not os.path.islink(dest):
                import shutil
                shutil.rmtree(dest, ignore_errors=True)

    def _safe_copy(self, src, dest):
        username = os.path.basename(src).rsplit('+', 3)[0]
        why = self._refusal(src, username)
        if why:  # swapped since init_src
            raise SubmissionRefused(why)
        uid = pwd.getpwnam(username).pw_uid
        top = os.open(src, _DIR)  # ELOOP if it became a symlink meanwhile
        try:
            if os.fstat(top).st_uid != uid:
                raise SubmissionRefused(f"it no longer belongs to {username}")
            budget = [1000 * self.coursedir.max_dir_size]
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.mkdir(dest, 0o755)
            self._copy_dir(top, dest, src, uid, budget, 0)
        finally:
            os.close(top)

    def _ignored(self, name: str, is_file: bool) -> bool:
        if any(fnmatch.fnmatch(name, g) for g in self.coursedir.ignore):
            return True
        return is_file and bool(self.coursedir.include) and not any(
            fnmatch.fnmatch(name, g) for g in self.coursedir.include)

    def _copy_dir(self, dfd: int, dest: str, shown: str, uid: int, budget: list, depth: int) -> None:
        if depth > MAX_DEPTH:
            self.log.warning("Skipping %s: folders nested deeper than %d", shown, MAX_DEPTH)
            return
        for name in sorted(os.listdir(dfd)):
            where = os.path.join(shown, name)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                self.log.warning("Skipping %s: a symlink (symlinks are never collected)", where)
                continue
            if st.st_uid != uid:
                self.log.warning("Skipping %s: it does not belong to the student", where)
                continue
            if stat.S_ISDIR(st.st_mode):
                if self._ignored(name, False):
                    continue
                fd = os.open(name, _DIR, dir_fd=dfd)
                try:
                    if os.fstat(fd).st_uid != uid:
                        continue
                    out = os.path.join(dest, name)
                    os.mkdir(out, 0o755)
                    self._copy_dir(fd, out, where, uid, budget, depth + 1)
                finally:
                    os.close(fd)
            elif stat.S_ISREG(st.st_mode):
                if self._ignored(name, True):
                    continue
                self._copy_file(dfd, name, os.path.join(dest, name), where, uid, budget)
            else:
                self.log.warning("Skipping %s: not a regular file", where)

    def _copy_file(self, dfd: int, name: str, out: str, shown: str, uid: int, budget: list) -> None:
        fd = os.open(name, _FILE, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                self.log.warning("Skipping %s: changed while being collected", shown)
                return
            if st.st_size > 1000 * self.coursedir.max_file_size:
                self.log.warning("Skipping %s: %d bytes, over max_file_size", shown, st.st_size)
                return
            budget[0] -= st.st_size
            if budget[0] < 0:
                raise RuntimeError(f"Directory size is too big (over max_dir_size): {shown}")
            ofd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            with os.fdopen(ofd, "wb") as f:
                left = st.st_size  # never more than fstat said (a file growing meanwhile)
                while left > 0:
                    chunk = os.read(fd, min(left, 1 << 20))
                    if not chunk:
                        break
                    f.write(chunk)
                    left -= len(chunk)
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)
