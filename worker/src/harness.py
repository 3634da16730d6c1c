# Runs one user program inside the sandbox. The worker starts `python -I -B -c <this file>` with
# the code on descriptor 3; an uncaught exception is described as JSON on descriptor 4.
# Nothing is imported up front beyond what the interpreter has already loaded: the modules
# needed to describe an exception are imported only when there is one.
import sys


def _pyrunner_quote(text):
    # JSON string literal without the json module (which costs ~9 ms to import, and may be
    # impossible to import right after a MemoryError).
    out = []
    for ch in text:
        code = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif code < 0x20:
            out.append("\\u%04x" % code)
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")  # a lone surrogate is not valid JSON
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _pyrunner_run():
    import os

    with open(3, "rb", closefd=True) as code_file:
        source = code_file.read().decode("utf-8")
    report = open(4, "w", encoding="utf-8", errors="replace", closefd=True)
    # Released first when an exception is described, so there is memory to do it with.
    reserve = bytearray(256 * 1024)

    filename = "main.py"
    main = type(sys)("__main__")
    main.__file__ = filename
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = [filename]
    sys.path.insert(0, os.getcwd())

    exit_code = 0
    try:
        code = compile(source, filename, "exec", dont_inherit=True)
        exec(code, main.__dict__)
    except SystemExit as e:
        if e.code is None:
            exit_code = 0
        elif isinstance(e.code, int):
            exit_code = e.code & 0xFF
        else:
            print(e.code, file=sys.stderr)
            exit_code = 1
    except BaseException as e:
        del reserve
        exit_code = 1
        kind = type(e)
        name = kind.__qualname__
        if kind.__module__ not in ("builtins", "__main__"):
            name = f"{kind.__module__}.{name}"
        memory = isinstance(e, MemoryError)
        try:
            message = str(e)
        except BaseException:
            message = "<exception str() failed>"
        try:
            import linecache
            import traceback

            lines = source.splitlines(keepends=True)
            linecache.cache[filename] = (len(source), None, lines, filename)
            # Drop the harness's own frame so the traceback starts in the user's code.
            tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
            text = "".join(traceback.format_exception(kind, e, tb))
        except BaseException:
            text = f"{name}: {message}\n"
        try:
            sys.stderr.write(text)
        except BaseException:
            pass
        try:
            report.write(
                '{"type": %s, "message": %s, "traceback": %s, "memory": %s}'
                % (
                    _pyrunner_quote(name),
                    _pyrunner_quote(message),
                    _pyrunner_quote(text),
                    "true" if memory else "false",
                )
            )
        except BaseException:
            pass
    try:
        report.close()
    except BaseException:
        pass
    return exit_code


sys.exit(_pyrunner_run())
