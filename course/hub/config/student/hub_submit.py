"""nbgrader's submit on the hub, leaving the submission writable by its student only.

nbgrader's submit makes the submission folder in the inbound folder mode 0777 ("so the
instructor can delete later"): anyone who learns its name (the time stamp and random suffix
are in it) could delete the student's notebook and put another in its place. The hub's
collector already skips files that the student does not own; ``SafeExchangeSubmit``
(``c.ExchangeFactory.submit`` in this folder's ``nbgrader_config.py``) also closes the folder:
mode 0755, like the folders inside it. Collecting only reads it; an instructor who wants to
clean the inbound folder does it as root.
"""
import os

from nbgrader.exchange.default.submit import ExchangeSubmit


class SafeExchangeSubmit(ExchangeSubmit):
    def copy_files(self):
        super().copy_files()
        os.chmod(os.path.join(self.inbound_path, self.assignment_filename), 0o755)
