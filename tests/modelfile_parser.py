"""An independent reading of a Modelfile, following the state machine of Ollama's parser/parser.go.

Used only by the tests, to check that what lorad writes means to Ollama exactly what lorad meant.
Behaviour it reproduces: commands are a case-insensitive word then a space; a value ends at a space
or a newline *once the text so far is complete* — unquoted, "…" or \"\"\"…\"\"\" — with no escape
characters; characters Go's strconv.IsPrint rejects are dropped (tab and newline are kept inside
quotes); `#` starts a comment line; PARAMETER takes a name of letters, digits and '_'.
"""

from __future__ import annotations

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires"}
NIL, NAME, VALUE, PARAMETER, MESSAGE, COMMENT = range(6)


class ModelfileError(Exception):
    pass


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        if len(s) >= 6 and s.endswith('"""'):
            return s[3:-3], True
        return "", False
    if s.startswith('"'):
        if len(s) >= 2 and s.endswith('"'):
            return s[1:-1], True
        return "", False
    return s, True


def _is_print(ch: str) -> bool:
    return ch == " " or (ch.isprintable() and not ch.isspace())


def _step(ch: str, state: int) -> tuple[int, str | None]:
    space, newline = ch in " \t", ch in "\r\n"
    if state == NIL:
        if ch == "#":
            return COMMENT, None
        if space or newline:
            return NIL, None
        return NAME, ch
    if state == NAME:
        if ch.isascii() and ch.isalpha():
            return NAME, ch
        if space:
            return VALUE, None
        raise ModelfileError("invalid command")
    if state == VALUE:
        return (NIL, ch) if (newline or space) else (VALUE, ch)
    if state in (PARAMETER, MESSAGE):
        if ch.isascii() and (ch.isalpha() or (state == PARAMETER and (ch.isdigit() or ch == "_"))):
            return state, ch
        if space:
            return VALUE, None
        raise ModelfileError("unexpected end of a parameter or message")
    return (NIL, None) if newline else (COMMENT, None)  # COMMENT


def parse(text: str) -> list[tuple[str, str]]:
    """[(command, value)] as Ollama reads them; 'from' is reported as 'model', PARAMETER as its name."""
    commands: list[tuple[str, str]] = []
    state, buf, name, role = NIL, "", "", ""
    for ch in text:
        nxt, out = _step(ch, state)
        if nxt != state:
            if state == NAME:
                word = buf.lower()
                if word not in COMMANDS:
                    raise ModelfileError(f"unknown command {buf!r}")
                if word == "parameter":
                    nxt = PARAMETER
                elif word == "message":
                    nxt = MESSAGE
                    name = word
                else:
                    name = "model" if word == "from" else word
            elif state == PARAMETER:
                name = buf
            elif state == MESSAGE:
                role = buf
            elif state == VALUE:
                value, ok = _unquote(buf.strip())
                if not ok or ch in " \t":
                    buf += ch
                    continue
                if role:
                    value, role = f"{role}: {value}", ""
                commands.append((name, value))
            buf, state = "", nxt
        if out is not None and _is_print(out):
            buf += out
    if state == VALUE:
        value, ok = _unquote(buf.strip())
        if not ok:
            raise ModelfileError("unexpected end of file inside a quoted value")
        commands.append((name, f"{role}: {value}" if role else value))
    elif state not in (NIL, COMMENT):
        raise ModelfileError("unexpected end of file")
    if not any(c == "model" for c, _ in commands):
        raise ModelfileError("no FROM line")
    return commands
