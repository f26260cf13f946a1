"""Lossless compression of stored instances (R-UP-1, issue 4 §1).

``table``: the pluggable codec table (JPEG-LS lossless by default, JPEG 2000 lossless, RLE);
``transcode``: one file, compressed and proven bit-exact; ``stage``: the front-end's durable
queue and worker that compress after ingest, off the C-STORE path.
"""

from gateway.codec.table import CODECS, Codec, codec_for
from gateway.codec.transcode import Outcome, Status, compress

__all__ = ["CODECS", "Codec", "Outcome", "Status", "codec_for", "compress"]
