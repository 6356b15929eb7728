import sys


def _main() -> int:
    argv = sys.argv[1:]
    # archive_command and restore_command run once per WAL file: a file an earlier call
    # archived or decrypted ahead (or one the archive does not have) is answered before
    # the command line tool (and the crypto stack) is even imported.
    if argv[:1] == ["wal-push"]:
        from .archive import answered_ahead  # noqa: PLC0415 - before the heavy imports

        if answered_ahead(argv[1:]):
            return 0
    if argv[:1] == ["wal-fetch"]:
        from .archive import answered_fetch  # noqa: PLC0415 - before the heavy imports

        answer = answered_fetch(argv[1:])
        if answer is not None:
            return answer
    from .cli import main  # noqa: PLC0415 - only when the quick answer did not do

    return main()


sys.exit(_main())
