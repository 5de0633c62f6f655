"""The one root of TinyFlux's own errors, and how the scripts print them.

Every error class TinyFlux raises for bad input or a fault it can name (a bad flag, a damaged shard, a full disk)
derives from TinyFluxError, so a script catches them all with one `except` and prints `script: error: MESSAGE` with
exit code 1 or 2 instead of a traceback. The classes keep their old builtin bases too (ValueError, RuntimeError), so
code that caught those still does.
"""

from __future__ import annotations

import errno

# DataLoader re-raises a worker's exception as the same class with this text and the worker's traceback before the
# original message (torch.utils.data._utils.ExceptionWrapper.reraise).
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class TinyFluxError(Exception):
    """Base class of every TinyFlux error: its message says what is wrong, where, and how to fix it."""


def message(e: BaseException) -> str:
    """The message of `e` without any DataLoader-worker traceback around it (the last line the traceback printed)."""
    text = str(e)
    if _WORKER_TRACEBACK not in text:
        return text
    marker = f"{type(e).__module__}.{type(e).__qualname__}: "
    cut = text.rfind(marker)
    return text[cut + len(marker) :].strip() if cut >= 0 else text.strip().splitlines()[-1]


def os_error_message(e: OSError, action: str) -> str:
    """`action` failed, with the errno name shown (ENOSPC, EROFS, EACCES), which is what the fix depends on."""
    name = errno.errorcode.get(e.errno or 0, "")
    where = f" {e.filename}" if e.filename else ""
    hint = {
        errno.ENOSPC: "the disk is full: free space or write elsewhere",
        errno.EROFS: "the file system is read-only: write elsewhere",
        errno.EACCES: "no permission: write elsewhere or fix the permissions",
        errno.EDQUOT: "the disk quota is exhausted: free space or write elsewhere",
    }.get(e.errno or 0, "")
    return f"{action}:{where} [{name or 'OSError'}] {e.strerror or e}" + (f"; {hint}" if hint else "")
