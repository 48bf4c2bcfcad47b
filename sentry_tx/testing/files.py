"""
Writing files in tests: text or bytes to a path, in one call.
"""


def write_file(path, data):
    """
    Write C{data} to C{path}, as bytes when it is L{bytes}, else as text.

    @return: C{path}.
    """
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path
