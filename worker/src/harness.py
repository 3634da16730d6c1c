# Runs one user program inside the sandbox. The worker starts `python -I -B -c <this file>` with
# the code on descriptor 3; an uncaught exception is described as JSON on descriptor 4.
import sys


def _pyrunner_run():
    import json
    import linecache
    import os
    import traceback
    import types

    with open(3, "rb", closefd=True) as code_file:
        source = code_file.read().decode("utf-8")
    report = open(4, "w", encoding="utf-8", closefd=True)
    # Fail fast on MemoryError reports: keep this much memory to format one.
    reserve = bytearray(256 * 1024)

    filename = "main.py"
    lines = source.splitlines(keepends=True)
    linecache.cache[filename] = (len(source), None, lines, filename)

    main = types.ModuleType("__main__")
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
        info = {"type": name, "message": "", "traceback": "", "memory": isinstance(e, MemoryError)}
        try:
            info["message"] = str(e)
        except BaseException:
            info["message"] = "<exception str() failed>"
        try:
            # Drop the harness's own frame so the traceback starts in the user's code.
            tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
            # A SyntaxError has no user frame; its location is in the exception itself.
            info["traceback"] = "".join(traceback.format_exception(kind, e, tb))
        except BaseException:
            info["traceback"] = f"{name}: {info['message']}\n"
        try:
            sys.stderr.write(info["traceback"])
        except BaseException:
            pass
        try:
            report.write(json.dumps(info))
        except BaseException:
            pass
    try:
        report.close()
    except BaseException:
        pass
    return exit_code


sys.exit(_pyrunner_run())
