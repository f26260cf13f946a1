"""The REST edge (``/api/v1``): our own resources beside DICOMweb — forwarding status, inventories,
metrics. Like ``dicomweb/``, it translates HTTP to domain calls and knows no domain rules."""
