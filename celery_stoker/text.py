"""Text that reaches a terminal or a broadcast: control characters, escaping, one-line errors.

A Stoker's name is chosen in code, but hostnames, errors and names shown by
``celery stoker status`` are read back from Redis, and anyone who can write
there can put an escape sequence in them (move the cursor, rewrite earlier
lines, retitle the terminal).  So names refuse control characters where they
are written (:func:`control_character`, used by ``@stoker``), and whatever is
printed from Redis goes through :func:`printable` first.  What a worker
broadcasts of an error is :func:`brief`: the traceback stays in its log.
"""

from __future__ import annotations

#: The Unicode names (formal aliases) of the C0 controls, U+0000 to U+001F.
_C0_NAMES = (
    "NULL", "START OF HEADING", "START OF TEXT", "END OF TEXT", "END OF TRANSMISSION",
    "ENQUIRY", "ACKNOWLEDGE", "ALERT", "BACKSPACE", "CHARACTER TABULATION", "LINE FEED",
    "LINE TABULATION", "FORM FEED", "CARRIAGE RETURN", "SHIFT OUT", "SHIFT IN",
    "DATA LINK ESCAPE", "DEVICE CONTROL ONE", "DEVICE CONTROL TWO", "DEVICE CONTROL THREE",
    "DEVICE CONTROL FOUR", "NEGATIVE ACKNOWLEDGE", "SYNCHRONOUS IDLE",
    "END OF TRANSMISSION BLOCK", "CANCEL", "END OF MEDIUM", "SUBSTITUTE", "ESCAPE",
    "INFORMATION SEPARATOR FOUR", "INFORMATION SEPARATOR THREE", "INFORMATION SEPARATOR TWO",
    "INFORMATION SEPARATOR ONE",
)  # fmt: skip
#: The same for the C1 controls, U+0080 to U+009F.
_C1_NAMES = (
    "PADDING CHARACTER", "HIGH OCTET PRESET", "BREAK PERMITTED HERE", "NO BREAK HERE", "INDEX",
    "NEXT LINE", "START OF SELECTED AREA", "END OF SELECTED AREA", "CHARACTER TABULATION SET",
    "CHARACTER TABULATION WITH JUSTIFICATION", "LINE TABULATION SET", "PARTIAL LINE FORWARD",
    "PARTIAL LINE BACKWARD", "REVERSE LINE FEED", "SINGLE SHIFT TWO", "SINGLE SHIFT THREE",
    "DEVICE CONTROL STRING", "PRIVATE USE ONE", "PRIVATE USE TWO", "SET TRANSMIT STATE",
    "CANCEL CHARACTER", "MESSAGE WAITING", "START OF GUARDED AREA", "END OF GUARDED AREA",
    "START OF STRING", "SINGLE GRAPHIC CHARACTER INTRODUCER", "SINGLE CHARACTER INTRODUCER",
    "CONTROL SEQUENCE INTRODUCER", "STRING TERMINATOR", "OPERATING SYSTEM COMMAND",
    "PRIVACY MESSAGE", "APPLICATION PROGRAM COMMAND",
)  # fmt: skip

#: The longest error a worker broadcasts (``inspect stoker``'s ``last_error`` and the like).
BRIEF_LIMIT = 200


def control_name(char: str) -> str | None:
    """``"U+001B ESCAPE"`` for a C0 or C1 control character or DEL, None for any other."""
    code = ord(char)
    if code < 0x20:
        name = _C0_NAMES[code]
    elif code == 0x7F:
        name = "DELETE"
    elif 0x80 <= code < 0xA0:
        name = _C1_NAMES[code - 0x80]
    else:
        return None
    return f"U+{code:04X} {name}"


def control_character(text: str) -> tuple[int, str] | None:
    """The position and name of the first control character in ``text``, or None."""
    for position, char in enumerate(text):
        name = control_name(char)
        if name is not None:
            return position, name
    return None


def printable(text: object) -> str:
    """``str(text)`` with every character a terminal would not print escaped as repr does.

    Control characters, DEL, Unicode format characters (bidirectional overrides,
    zero-width ones) and separators other than the space become ``\\x1b``,
    ``\\u202e`` and the like, so text read from Redis cannot drive the terminal.
    """
    value = str(text)
    if value.isprintable():
        return value
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in value
    )


def brief(error: object) -> str | None:
    """The first line of ``error``, at most :data:`BRIEF_LIMIT` characters (None stays None).

    A callback's error reads ``event() raised ValueError: <first line>`` followed
    by its traceback: the broadcast keeps the type and the first line, the
    worker's log keeps the rest.
    """
    if error is None:
        return None
    lines = str(error).strip().splitlines()
    first = lines[0].rstrip() if lines else ""
    if len(first) > BRIEF_LIMIT:
        first = first[: BRIEF_LIMIT - 3] + "..."
    return first
