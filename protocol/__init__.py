"""vmwipe wire protocol v2 (and v1 tables): table layout, validation, SSDT, and C header generation.

See SPEC.md in this folder; `layout` holds the construct definitions every other
piece is derived from.
"""

from .errors import HeaderError, ProtocolError, SlotError, SsdtError
from .layout import (
    ACPI_HID,
    CRNG_FIELDS_OFFSET,
    CRNG_FIELDS_SIZE,
    CRNG_REASON_LEN,
    CRNG_STATUS_ACTIVE,
    CRNG_STATUS_DISABLED,
    CRNG_STATUS_NAMES,
    CRNG_STATUS_NOT_REPORTED,
    CRNG_STATUS_REFUSED,
    HEADER_CRC_LEN,
    HEADER_SIZE,
    HOST_FIELDS_SIZE,
    MAGIC,
    MAGIC_V1,
    MIN_REGION_SIZE,
    PAGE_SIZE,
    SLOT_FILL,
    SLOT_SIZE,
    SLOT_VALID,
    SLOTS_OFFSET,
    VERSION,
    VERSION_V1,
    WIPE_GENERATION_OFFSET,
    WIPE_PAGES_OFFSET,
)
from .sizes import parse_size
from .ssdt import decode_ssdt, encode_ssdt
from .table import (
    Fill,
    Header,
    Region,
    Slot,
    Table,
    build_region,
    decode_header,
    decode_table,
    encode_crng_fields,
    encode_fill,
    encode_header,
    encode_host_fields,
    encode_slot,
    merge_ranges,
    slot_count_for,
    validate_region,
)

__all__ = [
    "ACPI_HID", "CRNG_FIELDS_OFFSET", "CRNG_FIELDS_SIZE", "CRNG_REASON_LEN", "CRNG_STATUS_ACTIVE",
    "CRNG_STATUS_DISABLED", "CRNG_STATUS_NAMES", "CRNG_STATUS_NOT_REPORTED",
    "CRNG_STATUS_REFUSED", "HEADER_CRC_LEN", "HEADER_SIZE", "HOST_FIELDS_SIZE", "MAGIC", "MAGIC_V1",
    "MIN_REGION_SIZE", "PAGE_SIZE", "SLOTS_OFFSET", "SLOT_FILL", "SLOT_SIZE", "SLOT_VALID",
    "VERSION", "VERSION_V1", "WIPE_GENERATION_OFFSET", "WIPE_PAGES_OFFSET", "Fill", "Header",
    "HeaderError", "ProtocolError", "Region", "Slot", "SlotError", "SsdtError", "Table",
    "build_region", "decode_header", "decode_ssdt", "decode_table", "encode_crng_fields",
    "encode_fill", "encode_header", "encode_host_fields", "encode_slot", "encode_ssdt",
    "merge_ranges", "parse_size", "slot_count_for", "validate_region",
]
