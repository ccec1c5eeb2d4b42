"""Types of the C loops in _ramwalk.c (the scrub's record walk and listed-page lookup)."""

from typing_extensions import Buffer

def ram_run(buf: Buffer, pos: int, limit: int, block_length: int, /
            ) -> tuple[int, bytes, bytes, bytes]: ...
def select(blocks: Buffer, pages: Buffer, sorted_keys: Buffer, /) -> bytes: ...
