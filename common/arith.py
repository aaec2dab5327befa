"""Integer arithmetic shared by the engine, the KV transfer and the services."""


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ``a`` and positive ``b``, without floats."""
    return -(-a // b)
