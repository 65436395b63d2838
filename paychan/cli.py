"""The `paychan` command line."""
import sys


def main(argv: list[str] | None = None) -> int:
    print("paychan demo: not built yet")
    return 1


if __name__ == "__main__":
    sys.exit(main())
