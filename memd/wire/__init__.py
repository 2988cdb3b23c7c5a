"""The memd wire protocol: the bytes between the guest agent and the host agent.

``docs/protocol.md`` is the normative description; this package is its executable
form.  It does no I/O and uses only the standard library available in Debian's
python3-minimal (``struct``, ``zlib``, ``enum``, ``typing``), because the guest imports
it; a host with ``zlib-ng`` computes the same CRC-32 with it, faster.

Modules, each depending only on those above it:

* :mod:`memd.wire.constants` — opcodes, statuses, flag and capability bits, limits,
  header layout;
* :mod:`memd.wire.messages` — one typed request and one typed reply per op;
* :mod:`memd.wire.payload`, :mod:`memd.wire.payload_info` — the payload codec of each
  shape (validating; only :class:`~memd.errors.FrameError` escapes);
* :mod:`memd.wire.framing` — header, frame encoding, the incremental
  :class:`FrameDecoder` that resynchronises after garbage or a cut;
* :mod:`memd.wire.ops` — :data:`OPS`, the one op table, and the message codec
  (``encode_request(request_id, msg)``: the op is the one of the message's type);
* :mod:`memd.wire.status` — exceptions to reply statuses and back.

Everything public is re-exported here: callers write ``from memd.wire import X``.
"""

from __future__ import annotations

# The exceptions the status tables name, importable from here as before.
from memd.errors import AccessDenied as AccessDenied
from memd.errors import ClientFrozen as ClientFrozen
from memd.errors import FrameError as FrameError
from memd.errors import InvalidArgument as InvalidArgument
from memd.errors import MemdError as MemdError
from memd.errors import NoSpace as NoSpace
from memd.errors import NoSuchPool as NoSuchPool
from memd.errors import NotShareable as NotShareable
from memd.errors import ProtocolError as ProtocolError
from memd.errors import RemoteError as RemoteError
from memd.errors import SharingError as SharingError
from memd.errors import StaleHandle as StaleHandle
from memd.errors import TmemError as TmemError
from memd.errors import VersionError as VersionError
from memd.wire.constants import ALL_CAPABILITIES as ALL_CAPABILITIES
from memd.wire.constants import HEADER as HEADER
from memd.wire.constants import HEADER_SIZE as HEADER_SIZE
from memd.wire.constants import KNOWN_FRAME_FLAGS as KNOWN_FRAME_FLAGS
from memd.wire.constants import KNOWN_POOL_FLAGS as KNOWN_POOL_FLAGS
from memd.wire.constants import MAGIC as MAGIC
from memd.wire.constants import MAX_BATCH as MAX_BATCH
from memd.wire.constants import MAX_GFNS as MAX_GFNS
from memd.wire.constants import MAX_MESSAGE as MAX_MESSAGE
from memd.wire.constants import MAX_PAYLOAD as MAX_PAYLOAD
from memd.wire.constants import MAX_POOLS as MAX_POOLS
from memd.wire.constants import MAX_PSI as MAX_PSI
from memd.wire.constants import MAX_REQUEST_ID as MAX_REQUEST_ID
from memd.wire.constants import MAX_STATS as MAX_STATS
from memd.wire.constants import MAX_VERSION as MAX_VERSION
from memd.wire.constants import MIN_VERSION as MIN_VERSION
from memd.wire.constants import NO_GFN as NO_GFN
from memd.wire.constants import PAGE_SIZE as PAGE_SIZE
from memd.wire.constants import PARTIAL_FRAME_TIMEOUT as PARTIAL_FRAME_TIMEOUT
from memd.wire.constants import PORT_NAME as PORT_NAME
from memd.wire.constants import PROTOCOL_VERSION as PROTOCOL_VERSION
from memd.wire.constants import RESYNC_MARKER as RESYNC_MARKER
from memd.wire.constants import SUPPORTED_VERSIONS as SUPPORTED_VERSIONS
from memd.wire.constants import SYNC_RETRY_INTERVAL as SYNC_RETRY_INTERVAL
from memd.wire.constants import Buffer as Buffer
from memd.wire.constants import Capability as Capability
from memd.wire.constants import FrameFlag as FrameFlag
from memd.wire.constants import Handle as Handle
from memd.wire.constants import MemReportFlag as MemReportFlag
from memd.wire.constants import Oid as Oid
from memd.wire.constants import Op as Op
from memd.wire.constants import PoolFlag as PoolFlag
from memd.wire.constants import ShareState as ShareState
from memd.wire.constants import Status as Status
from memd.wire.constants import oid_from_int as oid_from_int
from memd.wire.constants import oid_to_int as oid_to_int
from memd.wire.framing import Frame as Frame
from memd.wire.framing import FrameDecoder as FrameDecoder
from memd.wire.framing import encode_frame as encode_frame
from memd.wire.framing import encode_frame_parts as encode_frame_parts
from memd.wire.messages import AboutToWriteReply as AboutToWriteReply
from memd.wire.messages import AboutToWriteRequest as AboutToWriteRequest
from memd.wire.messages import DestroyPoolReply as DestroyPoolReply
from memd.wire.messages import DestroyPoolRequest as DestroyPoolRequest
from memd.wire.messages import EmptyReply as EmptyReply
from memd.wire.messages import ErrorReply as ErrorReply
from memd.wire.messages import FlushObjectReply as FlushObjectReply
from memd.wire.messages import FlushObjectRequest as FlushObjectRequest
from memd.wire.messages import FlushPageReply as FlushPageReply
from memd.wire.messages import FlushPageRequest as FlushPageRequest
from memd.wire.messages import GetBatchReply as GetBatchReply
from memd.wire.messages import GetBatchRequest as GetBatchRequest
from memd.wire.messages import GetReply as GetReply
from memd.wire.messages import GetRequest as GetRequest
from memd.wire.messages import HelloReply as HelloReply
from memd.wire.messages import HelloRequest as HelloRequest
from memd.wire.messages import ListPoolsReply as ListPoolsReply
from memd.wire.messages import ListPoolsRequest as ListPoolsRequest
from memd.wire.messages import MemReportReply as MemReportReply
from memd.wire.messages import MemReportRequest as MemReportRequest
from memd.wire.messages import NewPoolReply as NewPoolReply
from memd.wire.messages import NewPoolRequest as NewPoolRequest
from memd.wire.messages import NominateReply as NominateReply
from memd.wire.messages import NominateRequest as NominateRequest
from memd.wire.messages import NominateResult as NominateResult
from memd.wire.messages import PoolInfo as PoolInfo
from memd.wire.messages import PutBatchReply as PutBatchReply
from memd.wire.messages import PutBatchRequest as PutBatchRequest
from memd.wire.messages import PutReply as PutReply
from memd.wire.messages import PutRequest as PutRequest
from memd.wire.messages import RangeNominateItem as RangeNominateItem
from memd.wire.messages import RangeNominateReply as RangeNominateReply
from memd.wire.messages import RangeNominateRequest as RangeNominateRequest
from memd.wire.messages import RangeQueryItem as RangeQueryItem
from memd.wire.messages import RangeQueryReply as RangeQueryReply
from memd.wire.messages import RangeQueryRequest as RangeQueryRequest
from memd.wire.messages import RangeRequest as RangeRequest
from memd.wire.messages import Reply as Reply
from memd.wire.messages import Request as Request
from memd.wire.messages import ShareInfo as ShareInfo
from memd.wire.messages import ShareQueryReply as ShareQueryReply
from memd.wire.messages import ShareQueryRequest as ShareQueryRequest
from memd.wire.messages import StatsReply as StatsReply
from memd.wire.messages import StatsRequest as StatsRequest
from memd.wire.messages import SyncReply as SyncReply
from memd.wire.messages import SyncRequest as SyncRequest
from memd.wire.ops import OPS as OPS
from memd.wire.ops import OpSpec as OpSpec
from memd.wire.ops import decode_reply as decode_reply
from memd.wire.ops import decode_request as decode_request
from memd.wire.ops import encode_error as encode_error
from memd.wire.ops import encode_reply as encode_reply
from memd.wire.ops import encode_reply_parts as encode_reply_parts
from memd.wire.ops import encode_request as encode_request
from memd.wire.ops import encode_request_parts as encode_request_parts
from memd.wire.ops import negotiate_version as negotiate_version
from memd.wire.ops import op_of as op_of
from memd.wire.ops import spec_of as spec_of
from memd.wire.payload_info import decode_stats as decode_stats
from memd.wire.payload_info import encode_stats as encode_stats
from memd.wire.status import EXCEPTION_STATUS as EXCEPTION_STATUS
from memd.wire.status import STATUS_EXCEPTION as STATUS_EXCEPTION
from memd.wire.status import STATUS_TEXT as STATUS_TEXT
from memd.wire.status import error_for_status as error_for_status
from memd.wire.status import status_for_exception as status_for_exception
