# Runs one user program inside the sandbox; an uncaught exception is described as JSON on
# descriptor 4. Two ways in:
# - the fresh executor starts `python -I -B -c <this file>` with the code on descriptor 3;
# - the zygote loads this file as a module and calls prepare_zygote() once; each forked child
#   calls prepare(workdir) once in its sandbox, then serve(code) when its job arrives.
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


_FILENAME = "main.py"


def _pyrunner_begin(closefd=True):
    # Everything a run needs before its code arrives: a memory reserve and a fresh __main__
    # module. The report file is opened only if there is an exception to describe. In a
    # zygote's child the report descriptor stays open after the run, for the child to write its
    # end record to (closefd=False).
    import os

    # Released first when an exception is described, so there is address space to do it with.
    # A mapping, not a bytearray: it is reserved without being touched (a bytearray would fault
    # in 64 pages on every run).
    import mmap

    reserve = mmap.mmap(-1, 256 * 1024)
    main = type(sys)("__main__")
    main.__file__ = _FILENAME
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = [_FILENAME]
    sys.path.insert(0, os.getcwd())
    return [closefd, reserve, main]


def _pyrunner_execute(source, begun):
    closefd, reserve, main = begun
    begun.clear()
    filename = _FILENAME
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
            report = open(4, "w", encoding="utf-8", errors="replace", closefd=closefd)
            report.write(
                '{"type": %s, "message": %s, "traceback": %s, "memory": %s}'
                % (
                    _pyrunner_quote(name),
                    _pyrunner_quote(message),
                    _pyrunner_quote(text),
                    "true" if memory else "false",
                )
            )
            report.close()
        except BaseException:
            pass
    return exit_code


def prepare_zygote():
    # Once, in the zygote, after the preload imports: leave no buffered output to be copied
    # into every child, then move every object into the permanent generation, so that the
    # children's collections never write to (and so copy) the zygote's pages.
    import atexit
    import gc

    # What every run's harness imports, imported once here.
    import mmap  # noqa: F401
    import signal

    global _numpy_mt, _environ
    _numpy_mt = _find_numpy_mt()
    _environ = _find_environ()
    # As a fresh interpreter does at start: SIGINT raises KeyboardInterrupt. Installed once
    # here, it is inherited by every child (whose sandbox entry leaves this one handler be).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Handlers the preloaded modules registered belong to the zygote, which never runs them;
    # a run runs only its own.
    atexit._clear()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.collect()
    gc.freeze()


# Where numpy's global generator keeps its state (MT19937: 624 words, then the position), when
# the zygote could confirm that layout; a child then reseeds it with one write of kernel
# randomness instead of through numpy, whose seeding touches (and so copies) ~170 pages.
_numpy_mt = None
_MT_WORDS = 624


def _find_numpy_mt():
    np_random = sys.modules.get("numpy.random")
    if np_random is None:
        return None
    try:
        import ctypes

        import numpy

        legacy = np_random.mtrand._rand
        address = legacy._bit_generator.ctypes.state_address
        saved = legacy.get_state()
        # Set a known state through numpy's public API and read the memory back.
        key = numpy.arange(1, _MT_WORDS + 1, dtype=numpy.uint32)
        legacy.set_state(("MT19937", key, 17, 0, 0.0))
        expected = key.tobytes() + (17).to_bytes(4, sys.byteorder, signed=True)
        matches = ctypes.string_at(address, len(expected)) == expected
        # No cached Gaussian to carry into children (the fifth field is dropped with it).
        legacy.set_state(saved[:3] + (0, 0.0))
        return (address, ctypes) if matches else None
    except Exception:
        return None


def _pyrunner_reseed():
    # A forked child starts with its zygote's random state. CPython reseeds `random` itself
    # (an at-fork hook); the generators of preloaded libraries are reseeded here.
    import os

    modules = sys.modules
    if _numpy_mt is not None:
        # A whole new key from the kernel, and the position at its end so that the next draw
        # regenerates from it.
        address, ctypes = _numpy_mt
        state = os.urandom(_MT_WORDS * 4) + _MT_WORDS.to_bytes(4, sys.byteorder, signed=True)
        ctypes.memmove(address, state, len(state))
    elif "numpy.random" in modules:
        # 128 bits from the kernel; seed() without an argument draws 2.5 KB, 9 times slower.
        modules["numpy.random"].seed(list(memoryview(os.urandom(16)).cast("I")))
    sympy_random = modules.get("sympy.core.random")
    if sympy_random is not None:
        for name in ("rng", "_assumptions_rng"):
            generator = getattr(sympy_random, name, None)
            if generator is not None:
                generator.seed()
    tempfile = modules.get("tempfile")
    if tempfile is not None:
        tempfile.tempdir = None


_prepared = []
# os.environ's own dict (bytes keys) and the C-level putenv, found once in the zygote: setting
# a child's HOME and TMPDIR through them touches a few pages, through os.environ[...] about 50.
_environ = None


def _find_environ():
    import os

    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict) and b"HOME" in data and b"TMPDIR" in data:
        return (data, os.putenv)
    return None


def _set_home(workdir):
    if _environ is not None:
        data, putenv = _environ
        path = workdir.encode("utf-8", "surrogateescape")
        for key in (b"HOME", b"TMPDIR"):
            putenv(key, path)
            data[key] = path
    else:
        import os

        os.environ["HOME"] = workdir
        os.environ["TMPDIR"] = workdir


def prepare(workdir):
    # In a child forked from the zygote, inside its sandbox, before its job arrives: everything
    # that does not depend on the code, so that it is off the request path.
    _set_home(workdir)
    _pyrunner_reseed()
    _prepared.append(_pyrunner_begin(closefd=False))
    # A rehearsal of compiling and running code: the pages of the zygote that this writes (the
    # compiler's and the evaluation loop's, about 30) are copied now rather than during the run.
    exec(compile("pass", _FILENAME, "exec", dont_inherit=True), {})


def _threads_to_join(threading):
    # threading._shutdown runs the threading module's exit callbacks and joins the non-daemon
    # threads (the set of their locks). With neither there is nothing for it to do before the
    # exit, and skipping it spares the pages it would write (about 0.15 ms of a warm child's
    # run). Where these names are not what they were in 3.11, it runs.
    try:
        return bool(threading._threading_atexits) or bool(threading._shutdown_locks)
    except AttributeError:
        return True


def serve(code):
    # Runs the job of a prepared child and returns its exit code. What a fresh interpreter does
    # at exit is done here, since the child leaves with _exit: wait for non-daemon threads, run
    # atexit handlers, flush the standard streams.
    exit_code = _pyrunner_execute(code.decode("utf-8"), _prepared.pop())
    try:
        threading = sys.modules.get("threading")
        if threading is not None and _threads_to_join(threading):
            threading._shutdown()
        import atexit

        atexit._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            # As a fresh interpreter exits when it cannot flush its output.
            if exit_code == 0:
                exit_code = 120
    return exit_code


if __name__ == "__main__":
    with open(3, "rb", closefd=True) as code_file:
        source = code_file.read().decode("utf-8")
    sys.exit(_pyrunner_execute(source, _pyrunner_begin()))
