"""Every use of Flower's internals, in one place.

fedgate pins Flower 1.42.x. Its public API (`flwr.app`, `flwr.clientapp`, `flwr.serverapp`)
is used anywhere; anything else — protobuf serde, message construction with explicit
metadata, the simulation runtime, the SuperNode's runtime API — is imported here and only
here, so that an upgrade that moves them breaks one module and its contract test
(tests/test_flower_adapter.py), not six modules silently."""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.crypto.shamir import combine_shares as _combine_shares
from flwr.common.secure_aggregation.crypto.shamir import create_shares as _create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt as _decrypt
from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt as _encrypt
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key as _generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.common.secure_aggregation.secaggplus_constants import Key as _SecAggKey
from flwr.common.secure_aggregation.secaggplus_constants import Stage as _SecAggStage
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat as _share_keys_plaintext_concat,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_separate as _share_keys_plaintext_separate,
)
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedgate.gate import codec

REFUSAL_CODE = int(ErrorCode.MOD_FAILED_PRECONDITION)
CLIENT_APP_RAISED = int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)


def message_to_bytes(message: Message) -> bytes:
    """Byte for byte Flower's serialisation, written by `gate.codec` (one copy of the arrays
    instead of Flower's three; tests/gate/test_codec.py holds the two equal)."""
    return codec.encode_message(message)[0]


def flower_message_to_bytes(message: Message) -> bytes:
    """Flower's own serde: what `message_to_bytes` must equal (contract tests, benchmarks)."""
    return bytes(message_to_proto(message).SerializeToString())


def message_from_bytes(data: bytes | memoryview) -> Message:
    """Strict: bytes that do not parse as a Flower Message raise ValueError."""
    proto = ProtoMessage()
    try:
        proto.ParseFromString(data)
    except Exception as err:  # protobuf's DecodeError and friends
        raise ValueError(f"not a Flower Message: {err}") from err
    message: Message = message_from_proto(proto)
    return message


def context_to_bytes(context: Context) -> bytes:
    return bytes(context_to_proto(context).SerializeToString())


def context_from_bytes(data: bytes) -> Context:
    proto = ProtoContext()
    try:
        proto.ParseFromString(data)
    except Exception as err:
        raise ValueError(f"not a Flower Context: {err}") from err
    return context_from_proto(proto)


def recorddict_to_bytes(content: RecordDict) -> bytes:
    """The exact protobuf bytes of a record dict (what the ledger stores and hashes), written
    by `gate.codec`: byte for byte Flower's."""
    return codec.encode_recorddict(content)


def flower_recorddict_to_bytes(content: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(content).SerializeToString())


def recorddict_from_bytes(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    try:
        proto.ParseFromString(data)
    except Exception as err:
        raise ValueError(f"not a Flower RecordDict: {err}") from err
    return recorddict_from_proto(proto)


def head_of(wire: codec.WireMessage) -> Message:
    """A parsed message as a Flower Message with its metadata and error and the content left
    out (as Flower's `remove_content_from_message` does): for what needs only the metadata."""
    meta = wire.metadata
    metadata = Metadata(
        run_id=meta.run_id,
        message_id=meta.message_id,
        src_node_id=meta.src_node_id,
        dst_node_id=meta.dst_node_id,
        reply_to_message_id=meta.reply_to_message_id,
        group_id=meta.group_id,
        created_at=meta.created_at,
        ttl=meta.ttl,
        message_type=meta.message_type,
        src_task_id=meta.src_task_id,
        dst_task_id=meta.dst_task_id,
    )
    if wire.error is not None:
        code, reason = wire.error
        error = Error(code=code, reason=reason or None)
        message: Message = Message(metadata=metadata, error=error)  # type: ignore[call-overload]
    else:
        message = Message(metadata=metadata, content=RecordDict())  # type: ignore[call-overload]
    return message


def message_head(data: bytes) -> Message:
    """`head_of` the message in `data`, read by `gate.codec` without copying its arrays.
    Strict: bytes that are not a Flower Message raise ValueError."""
    return head_of(codec.parse_message(data))


def reply_metadata(instruction: Message, created_at: float) -> Metadata:
    """The metadata of a reply, every field taken from the instruction as pulled or set by
    the gate (`created_at` is the release slot): nothing the ClientApp wrote."""
    meta = instruction.metadata
    expires = meta.created_at + meta.ttl
    return Metadata(
        run_id=meta.run_id,
        message_id="",
        src_node_id=meta.dst_node_id,
        dst_node_id=meta.src_node_id,
        reply_to_message_id=meta.message_id,
        group_id=meta.group_id,
        created_at=created_at,
        ttl=max(expires - created_at, 0.0),
        message_type=meta.message_type,
        src_task_id=meta.dst_task_id,
        dst_task_id=meta.src_task_id,
    )


def make_reply(instruction: Message, created_at: float, content: RecordDict | None, error: Error | None) -> Message:
    """A reply built by the gate: gate-owned metadata and either checked content or an error."""
    message: Message = Message(metadata=reply_metadata(instruction, created_at), content=content, error=error)  # type: ignore[call-overload]
    return message


def refusal(instruction: Message, created_at: float, reason: str) -> Message:
    return make_reply(instruction, created_at, None, Error(code=REFUSAL_CODE, reason=reason))


def make_instruction(
    content: RecordDict,
    message_type: str,
    dst_node_id: int,
    run_id: int = 1,
    group_id: str = "",
    ttl: float = 3600.0,
    created_at: float | None = None,
) -> Message:
    """An instruction as the SuperLink delivers it (message id set), built without Flower's
    process-wide task identity: for fedgate's own checks and tests."""
    import time

    metadata = Metadata(
        run_id=run_id,
        message_id="",
        src_node_id=0,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id=group_id,
        created_at=time.time() if created_at is None else created_at,
        ttl=ttl,
        message_type=message_type,
    )
    message: Message = Message(metadata=metadata, content=content)  # type: ignore[call-overload]
    set_message_id(message, message.object_id)
    return message


def set_message_id(message: Message, message_id: str) -> None:
    """As the SuperLink does on push (tests and the simulation build instructions by hand)."""
    message.metadata.__dict__["_message_id"] = message_id


def metadata_fields(message: Message) -> dict[str, Any]:
    meta = message.metadata
    return {
        "run_id": meta.run_id,
        "message_id": meta.message_id,
        "src_node_id": meta.src_node_id,
        "dst_node_id": meta.dst_node_id,
        "reply_to_message_id": meta.reply_to_message_id,
        "group_id": meta.group_id,
        "created_at": meta.created_at,
        "ttl": meta.ttl,
        "message_type": meta.message_type,
        "src_task_id": meta.src_task_id,
        "dst_task_id": meta.dst_task_id,
    }


def new_run_id() -> int:
    """A run id as Flower's SuperLink makes one."""
    from flwr.common.constant import RUN_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes

    return int(generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))


def run_simulation(
    client_app: Any,
    server_app: Any,
    hospitals: int,
    run_id: int,
    run_config: dict[str, bool | int | float | str],
    ray_dir: str,
    verbose: bool,
    actors: int,
) -> None:
    """Flower's simulation engine (Ray backend) with our own run id and run config, and
    `actors` actors: each takes one of as many logical CPUs (PLATFORM-NOTES: Ray's default of
    two CPUs per actor runs one client at a time)."""
    import logging

    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run = Run.create_empty(run_id=run_id)
    run.override_config = run_config
    run.primary_task_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    # Flower's Message constructor reads the sender's identity from this process-wide slot.
    TaskIdentity.task_id = run.primary_task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(1, actors),
            "_temp_dir": ray_dir,
            # Nothing can reach a dashboard from the server side's sandbox (loopback only), and
            # its processes cost seconds of CPU at every start.
            "include_dashboard": False,
            "logging_level": logging.DEBUG if verbose else logging.ERROR,
            "log_to_driver": verbose,
        },
    }
    try:
        _run_simulation(
            num_supernodes=hospitals,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_config=backend_config,
            run=run,
            server_app_context=context,
            verbose_logging=verbose,
        )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()


# -- the SuperNode's runtime API (deployment) -------------------------------------------------

ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"


def runtime_client(
    address: str, insecure: bool, root_certificates: bytes | None, secret: bytes | None = None, token: str = ""
) -> Any:
    """A client of the SuperNode's runtime API, as flwr-clientapp makes one."""
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if secret:
        interceptors.append(
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=frozenset({ACQUIRE_METHOD}))
        )
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=root_certificates,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def acquire_task(client: Any) -> str:
    """The token of a ClientApp task the SuperNode offers, or "" when there is none."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return str(response.token) if response.HasField("task") and response.token else ""


def start_heartbeat(client: Any) -> Any:
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http

    sender = HeartbeatSender(make_task_heartbeat_fn_http(client))
    sender.start()
    return sender


def pull_task(client: Any) -> tuple[Message, Context, bytes, str]:
    """(instruction, context, the FAB's bytes, the FAB hash the SuperNode claims)."""
    from flwr.supernode.runtime.run_clientapp import pull_task_input

    message, context, _run, fab = pull_task_input(client)
    return message, context, bytes(fab.content), str(fab.hash_str)


def push_reply(client: Any, message: Message, context: Context) -> None:
    from flwr.supernode.runtime.run_clientapp import push_message

    push_message(client, message, context)


def finish_task(client: Any, context: Context | None, completed: bool) -> None:
    """Only a fixed word goes with it: no detail of what failed leaves the hospital."""
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime.run_clientapp import push_task_output

    status = SubStatus.COMPLETED if completed else SubStatus.FAILED
    push_task_output(client=client, context=context, sub_status=status, details="" if completed else "fedgate node")


# -- SecAgg+ (fedgate.secagg) -------------------------------------------------------------------
# Flower's SecAgg+ message layout and key-exchange primitives, used by the gate (client side) and
# by fedgate's server workflow. Flower's own mask generator (`pseudo_rand_gen`: a 32-byte seed
# folded to 32 bits for MT19937) is deliberately not imported: fedgate masks with ChaCha20.

SECAGG_CONFIGS = str(RECORD_KEY_CONFIGS)  # the ConfigRecord every SecAgg+ message carries
SECAGG_CLIENT_STATE = str(RECORD_KEY_STATE)  # where Flower's client mod keeps its keys (never used here)


class SecAggStage:
    SETUP = str(_SecAggStage.SETUP)
    SHARE_KEYS = str(_SecAggStage.SHARE_KEYS)
    COLLECT_MASKED_VECTORS = str(_SecAggStage.COLLECT_MASKED_VECTORS)
    UNMASK = str(_SecAggStage.UNMASK)
    ALL = (SETUP, SHARE_KEYS, COLLECT_MASKED_VECTORS, UNMASK)


class SecAggKey:
    STAGE = str(_SecAggKey.STAGE)
    SAMPLE_NUMBER = str(_SecAggKey.SAMPLE_NUMBER)
    SHARE_NUMBER = str(_SecAggKey.SHARE_NUMBER)
    THRESHOLD = str(_SecAggKey.THRESHOLD)
    CLIPPING_RANGE = str(_SecAggKey.CLIPPING_RANGE)
    TARGET_RANGE = str(_SecAggKey.TARGET_RANGE)
    MOD_RANGE = str(_SecAggKey.MOD_RANGE)
    MAX_WEIGHT = str(_SecAggKey.MAX_WEIGHT)
    PUBLIC_KEY_1 = str(_SecAggKey.PUBLIC_KEY_1)
    PUBLIC_KEY_2 = str(_SecAggKey.PUBLIC_KEY_2)
    DESTINATION_LIST = str(_SecAggKey.DESTINATION_LIST)
    CIPHERTEXT_LIST = str(_SecAggKey.CIPHERTEXT_LIST)
    SOURCE_LIST = str(_SecAggKey.SOURCE_LIST)
    MASKED_PARAMETERS = str(_SecAggKey.MASKED_PARAMETERS)
    ACTIVE_NODE_ID_LIST = str(_SecAggKey.ACTIVE_NODE_ID_LIST)
    DEAD_NODE_ID_LIST = str(_SecAggKey.DEAD_NODE_ID_LIST)
    NODE_ID_LIST = str(_SecAggKey.NODE_ID_LIST)
    SHARE_LIST = str(_SecAggKey.SHARE_LIST)


def new_key_pair() -> tuple[bytes, bytes]:
    """(private, public) of a fresh SecAgg+ key pair (ECDH on P-384, PEM), as Flower's mod makes one."""
    private, public = generate_key_pairs()
    return bytes(private_key_to_bytes(private)), bytes(public_key_to_bytes(public))


def check_public_key(public: bytes) -> None:
    """ValueError unless `public` is a PEM EC public key (as `new_key_pair` makes)."""
    try:
        bytes_to_public_key(public)
    except Exception as err:  # cryptography raises ValueError, TypeError or UnsupportedAlgorithm
        raise ValueError(f"not a SecAgg+ public key: {type(err).__name__}") from err


def shared_key(private: bytes, public: bytes) -> bytes:
    """ECDH then HKDF-SHA256, as Flower derives it: 32 bytes, base64url-encoded (Fernet's form)."""
    return bytes(_generate_shared_key(bytes_to_private_key(private), bytes_to_public_key(public)))


def encrypt_share(key: bytes, plaintext: bytes) -> bytes:
    return bytes(_encrypt(key, plaintext))


def decrypt_share(key: bytes, ciphertext: bytes) -> bytes:
    """Fernet (AES-128-CBC + HMAC-SHA256): a tampered or misdirected ciphertext raises ValueError."""
    try:
        return bytes(_decrypt(key, ciphertext))
    except Exception as err:  # cryptography.fernet.InvalidToken
        raise ValueError(f"a key share does not decrypt: {type(err).__name__}") from err


def create_shares(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir's secret sharing over GF(2^128), Flower's encoding (4-byte index, 16 bytes per chunk)."""
    return [bytes(share) for share in _create_shares(secret, threshold, count)]


def combine_shares(shares: list[bytes]) -> bytes:
    return bytes(_combine_shares(shares))


def share_plaintext(src: int, dst: int, seed_share: bytes, key_share: bytes) -> bytes:
    return bytes(_share_keys_plaintext_concat(src, dst, seed_share, key_share))


def share_plaintext_fields(plaintext: bytes) -> tuple[int, int, bytes, bytes]:
    src, dst, seed_share, key_share = _share_keys_plaintext_separate(plaintext)
    return int(src), int(dst), bytes(seed_share), bytes(key_share)


def message_with_content(message: Message, content: RecordDict) -> Message:
    """The same message (every metadata field as pulled, the message id included) with other content."""
    meta = message.metadata
    metadata = Metadata(
        run_id=meta.run_id,
        message_id=meta.message_id,
        src_node_id=meta.src_node_id,
        dst_node_id=meta.dst_node_id,
        reply_to_message_id=meta.reply_to_message_id,
        group_id=meta.group_id,
        created_at=meta.created_at,
        ttl=meta.ttl,
        message_type=meta.message_type,
        src_task_id=meta.src_task_id,
        dst_task_id=meta.dst_task_id,
    )
    copy: Message = Message(metadata=metadata, content=content)  # type: ignore[call-overload]
    set_message_id(copy, meta.message_id)
    return copy


class LegacyServer:
    """Flower's legacy server side, imported only where a ServerApp uses it (flwr.server is slow to
    import): the SecAgg+ workflow fedgate's extends, its state, and the FitRes/Parameters codecs."""

    def __init__(self) -> None:
        import flwr.compat.common.recorddict_compat as compat
        from flwr.common import bytes_to_ndarray, ndarray_to_bytes, ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.server import LegacyContext
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

        self.SecAggPlusWorkflow: type[Any] = SecAggPlusWorkflow
        self.WorkflowState: type[Any] = WorkflowState
        self.LegacyContext: type[Any] = LegacyContext
        self.MAIN_CONFIGS_RECORD = str(MAIN_CONFIGS_RECORD)
        self.MAIN_PARAMS_RECORD = str(MAIN_PARAMS_RECORD)
        self.CURRENT_ROUND = str(WorkflowKey.CURRENT_ROUND)
        self.recorddict_to_fitres = compat.recorddict_to_fitres
        self.arrayrecord_to_parameters = compat.arrayrecord_to_parameters
        self._parameters_to_arrayrecord = compat.parameters_to_arrayrecord
        self.parameters_to_ndarrays = parameters_to_ndarrays
        self.ndarrays_to_parameters = ndarrays_to_parameters
        self.ndarray_to_bytes = ndarray_to_bytes
        self.bytes_to_ndarray = bytes_to_ndarray

    def parameters_to_arrayrecord(self, parameters: Any) -> Any:
        return self._parameters_to_arrayrecord(parameters, True)


LEGACY_FIT = {
    "ins_parameters": "fitins.parameters",
    "ins_config": "fitins.config",
    "res_parameters": "fitres.parameters",
    "res_num_examples": "fitres.num_examples",
    "res_metrics": "fitres.metrics",
    "res_status": "fitres.status",
}
"""Flower's legacy FitIns/FitRes layout (flwr.compat.common.recorddict_compat), which SecAgg+ speaks."""
