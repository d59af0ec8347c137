"""The one base class of the user's mistakes."""
from __future__ import annotations


class UserError(ValueError):
    """Something the user can mend (a missing file, an option that does not fit, data that does not
    match): the scripts print its message as one line and exit with 2, without a traceback.  Real
    bugs raise anything else and keep their traceback."""
