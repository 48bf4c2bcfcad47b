"""
Writing files in tests: text or bytes to a path, in one call.
"""


def write_file(path: str, data: bytes | str) -> str:
    """
    Write C{data} to C{path}, as bytes when it is L{bytes}, else as text.

    @return: C{path}.
    """
    if isinstance(data, bytes):
        with open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "w") as f:
            f.write(data)
    return path
