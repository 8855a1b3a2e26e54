"""The hospital's side of SecAgg+, run by the gate: its keys, the server's stage messages read
strictly, and every stage reply checked against an allow-list before it is recorded and sent.

Flower's message layout and key exchange are kept (ECDH on P-384, Shamir shares, Fernet between
neighbours: `flower_adapter`), so fedgate's server workflow extends Flower's. Two things differ
from Flower's client mod: the keys live in a `ClientSession` in the gate's memory (never in a
Context, never in the sandbox), and masks come from ChaCha20 under 256-bit seeds (`masks`) over
integers mod 2^64 (`encoding`). The server's workflow names that protocol in its setup message;
a stock Flower workflow (MT19937 masks) is refused at setup.

What a malicious server can still do (Flower's SecAgg+ is for an honest-but-curious server):
public keys are not authenticated, so a server that runs Sybil nodes, or tells hospitals
different stories about who dropped, can unmask one hospital's vector. The checks here stop
what one gate can see: a lower threshold than the policy's, fewer survivors than the threshold,
a node named both alive and dropped, nodes it holds no shares of, a stage out of order, a
second unmask."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedgate.errors import GateRefusal
from fedgate.flower_adapter import (
    LEGACY_FIT,
    SECAGG_CONFIGS,
    SecAggKey,
    SecAggStage,
    check_public_key,
    create_shares,
    decrypt_share,
    encrypt_share,
    new_key_pair,
    share_plaintext,
    share_plaintext_fields,
    shared_key,
)
from fedgate.secagg import masks
from fedgate.secagg.encoding import MODULUS_BITS, STEP_LOG2_RANGE
from fedgate.secagg.policy import SecAggPolicy

PROTOCOL = "fedgate-secagg/1"
KEY_PROTOCOL = "fedgate.protocol"
KEY_PRG = "fedgate.prg"
KEY_STEP = "fedgate.step_log2"
KEY_MODULUS = "fedgate.modulus_bits"
FEDGATE_SETUP = {KEY_PROTOCOL: str, KEY_PRG: str, KEY_STEP: int, KEY_MODULUS: int}
FLOWER_SETUP = {
    SecAggKey.SAMPLE_NUMBER: int,
    SecAggKey.SHARE_NUMBER: int,
    SecAggKey.THRESHOLD: int,
    SecAggKey.CLIPPING_RANGE: float,
    SecAggKey.TARGET_RANGE: int,
    SecAggKey.MOD_RANGE: int,
    SecAggKey.MAX_WEIGHT: float,
}
MAX_NODES = 10_000
MAX_CIPHERTEXT = 8192  # Fernet over a seed share and a key share: about 700 bytes
PUBLIC_KEY_SIZE = (100, 400)  # PEM of a P-384 public key: 215 bytes
MAX_GROUP_ID = 200  # the round's id, kept in the session and the ledger


def protocol_error(message: str, **detail: Any) -> NoReturn:
    raise GateRefusal("secagg-protocol", message, **detail)


@dataclass(frozen=True)
class SetupParams:
    """The server's setup message, read strictly and checked against the hospital's policy."""

    node_id: int
    group_id: str
    sample_num: int
    share_num: int
    threshold: int
    step_log2: int

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "group_id": self.group_id,
            "sample_num": self.sample_num,
            "share_num": self.share_num,
            "threshold": self.threshold,
            "step_log2": self.step_log2,
            "protocol": PROTOCOL,
            "prg": masks.PRG,
            "modulus_bits": MODULUS_BITS,
        }


def stage_of(record: ConfigRecord) -> str:
    stage = record.get(SecAggKey.STAGE)
    if type(stage) is not str or stage not in SecAggStage.ALL:
        protocol_error(f"unknown SecAgg+ stage {stage!r}")
    return stage


def _exact_keys(record: ConfigRecord, expected: set[str], stage: str) -> None:
    keys = set(record)
    if keys != expected:
        protocol_error(
            f"the {stage} message has keys {sorted(keys)}, expected {sorted(expected)}",
            extra=sorted(keys - expected),
            missing=sorted(expected - keys),
        )


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_NODES or any(type(v) is not int for v in value):
        protocol_error(f"{what} must be a list of node ids")
    if len(set(value)) != len(value):
        protocol_error(f"{what} names a node twice")
    return list(value)


def parse_setup(record: ConfigRecord, node_id: int, group_id: str, policy: SecAggPolicy) -> SetupParams:
    named = (record.get(KEY_PROTOCOL), record.get(KEY_PRG), record.get(KEY_MODULUS))
    if named != (PROTOCOL, masks.PRG, MODULUS_BITS):
        protocol_error(
            f"the server's SecAgg+ workflow is not fedgate's (it names protocol {named[0]!r}, masks {named[1]!r}): "
            f"stock Flower masks with MT19937 from a 32-bit seed, which a server can search; this gate answers only "
            f"{PROTOCOL} ({masks.PRG}, mod 2^{MODULUS_BITS}): use fedgate.secagg.workflow in the ServerApp"
        )
    _exact_keys(record, {SecAggKey.STAGE, *FLOWER_SETUP, *FEDGATE_SETUP}, SecAggStage.SETUP)
    for key, kind in {**FLOWER_SETUP, **FEDGATE_SETUP}.items():
        if type(record[key]) is not kind:
            protocol_error(f"setup: {key} must be {kind.__name__}", key=key)
    sample_num, share_num, threshold, step_log2 = (
        cast(int, record[k]) for k in (SecAggKey.SAMPLE_NUMBER, SecAggKey.SHARE_NUMBER, SecAggKey.THRESHOLD, KEY_STEP)
    )
    if not 2 <= sample_num <= MAX_NODES or not 2 <= share_num <= sample_num:
        protocol_error(f"setup: {sample_num} hospitals sampled and {share_num} shares is not a valid round")
    if threshold < policy.threshold:
        protocol_error(
            f"the server's reconstruction threshold {threshold} is below this hospital's secagg.threshold "
            f"{policy.threshold}",
            threshold=threshold,
        )
    if threshold > share_num:
        protocol_error(f"setup: threshold {threshold} exceeds the {share_num} shares")
    if 2 * threshold <= share_num:
        # With t <= n/2 a server that tells half the neighbours "this hospital dropped" and the other
        # half "it survived" collects t shares of its first key AND t of its mask seed: its masked
        # vector in the clear. A majority threshold leaves room for only one of the two.
        protocol_error(
            f"setup: threshold {threshold} is not a majority of the {share_num} shares (a server could collect "
            "both secrets of one hospital from two halves of its neighbours)",
            threshold=threshold,
        )
    if len(group_id) > MAX_GROUP_ID:
        protocol_error(f"setup: a group id of {len(group_id)} characters")
    if not STEP_LOG2_RANGE[0] <= step_log2 <= STEP_LOG2_RANGE[1]:
        protocol_error(f"setup: step 2^{step_log2} is outside 2^{STEP_LOG2_RANGE[0]}..2^{STEP_LOG2_RANGE[1]}")
    return SetupParams(node_id, group_id, sample_num, share_num, threshold, step_log2)


_CONSTRUCT = object()


class ClientSession:
    """One hospital's keys for one SecAgg+ round, in the gate's memory only. It cannot be
    copied or pickled; `close()` drops every secret once the round ends or fails."""

    __slots__ = (
        "__seed",
        "__sk1",
        "__sk2",
        "_holders",
        "_key_shares",
        "_neighbours",
        "_pairwise",
        "_seed_shares",
        "masked_length",
        "params",
        "pk1",
        "pk2",
        "stage",
        "unmasked",
    )  # fmt: skip

    def __init__(self, params: SetupParams, *, _construct: object = None) -> None:
        if _construct is not _CONSTRUCT:
            raise TypeError("use ClientSession.start(params)")
        self.params = params
        sk1, self.pk1 = new_key_pair()
        sk2, self.pk2 = new_key_pair()
        self.__sk1: bytes | None = sk1
        self.__sk2: bytes | None = sk2
        self.__seed: bytes | None = None
        self._neighbours: dict[int, tuple[bytes, bytes]] = {}
        self._pairwise: dict[int, bytes] = {}  # neighbour -> Fernet key for its shares
        self._seed_shares: dict[int, bytes] = {}
        self._key_shares: dict[int, bytes] = {}
        self._holders: tuple[int, ...] = ()
        self.stage = SecAggStage.SETUP
        self.masked_length = -1
        self.unmasked: dict[str, list[int]] = {}

    @classmethod
    def start(cls, params: SetupParams) -> ClientSession:
        return cls(params, _construct=_CONSTRUCT)

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SecAgg+ session cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("a SecAgg+ session cannot be copied")

    def __deepcopy__(self, memo: Any) -> NoReturn:
        raise TypeError("a SecAgg+ session cannot be copied")

    def __repr__(self) -> str:
        return f"ClientSession(node {self.params.node_id}, {self.stage})"

    @property
    def node_id(self) -> int:
        return self.params.node_id

    @property
    def neighbours_masked(self) -> int:
        """How many pairwise masks this hospital's vector carries (neighbours whose shares arrived)."""
        return max(len(self._holders) - 1, 0)

    def _secret(self, value: bytes | None) -> bytes:
        if value is None:
            protocol_error("this SecAgg+ round is over; its keys are gone")
        return value

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            protocol_error(f"a SecAgg+ message out of order: expected after {stage}, this round is at {self.stage}")

    # -- the stages ------------------------------------------------------------------------------

    def setup_reply(self) -> dict[str, Any]:
        return {SecAggKey.PUBLIC_KEY_1: self.pk1, SecAggKey.PUBLIC_KEY_2: self.pk2}

    def share_keys(self, record: ConfigRecord) -> dict[str, Any]:
        """Check the neighbours' public keys, split this hospital's mask seed and first private
        key into Shamir shares, and encrypt one of each for every neighbour."""
        self._expect(SecAggStage.SETUP)
        if len(record) - 1 > self.params.share_num:  # before any key is parsed
            protocol_error(f"share_keys: {len(record) - 1} neighbours for {self.params.share_num} shares")
        neighbours: dict[int, tuple[bytes, bytes]] = {}
        for key, value in record.items():
            if key == SecAggKey.STAGE:
                continue
            if not key.isdigit() or len(key) > 20:
                protocol_error(f"share_keys: {key[:40]!r} is not a node id")
            if not (isinstance(value, list) and len(value) == 2 and all(type(v) is bytes for v in value)):
                protocol_error(f"share_keys: node {key}'s entry must be two public keys")
            pk1, pk2 = cast(list[bytes], value)
            for pk in (pk1, pk2):
                if not PUBLIC_KEY_SIZE[0] <= len(pk) <= PUBLIC_KEY_SIZE[1]:
                    protocol_error(f"share_keys: node {key}'s public key has {len(pk)} bytes")
                try:
                    check_public_key(pk)
                except ValueError:
                    protocol_error(f"share_keys: node {key}'s public key does not parse")
            neighbours[int(key)] = (pk1, pk2)
        params = self.params
        if neighbours.get(self.node_id) != (self.pk1, self.pk2):
            protocol_error("share_keys: this hospital's own public keys are missing or altered")
        if not params.threshold <= len(neighbours) <= params.share_num:
            protocol_error(f"share_keys: {len(neighbours)} neighbours for {params.share_num} shares, "
                           f"threshold {params.threshold}")  # fmt: skip
        keys = [pk for pair in neighbours.values() for pk in pair]
        if len(set(keys)) != len(keys):
            protocol_error("share_keys: two neighbours share a public key")
        sk2 = self._secret(self.__sk2)
        seed = secrets.token_bytes(masks.SEED_BYTES)
        self.__seed = seed
        seed_shares = create_shares(seed, params.threshold, params.share_num)
        key_shares = create_shares(self._secret(self.__sk1), params.threshold, params.share_num)
        destinations: list[int] = []
        ciphertexts: list[bytes] = []
        for index, (nid, (_, pk2)) in enumerate(neighbours.items()):
            if nid == self.node_id:
                self._seed_shares[nid], self._key_shares[nid] = seed_shares[index], key_shares[index]
                continue
            fernet_key = shared_key(sk2, pk2)
            self._pairwise[nid] = fernet_key
            plaintext = share_plaintext(self.node_id, nid, seed_shares[index], key_shares[index])
            destinations.append(nid)
            ciphertexts.append(encrypt_share(fernet_key, plaintext))
        self._neighbours = neighbours
        self.stage = SecAggStage.SHARE_KEYS
        return {SecAggKey.DESTINATION_LIST: destinations, SecAggKey.CIPHERTEXT_LIST: ciphertexts}

    def receive_shares(self, record: ConfigRecord) -> None:
        """The neighbours' shares, forwarded by the server: decrypted and checked here. Only the
        neighbours whose shares arrived get a pairwise mask (as in Flower's protocol)."""
        self._expect(SecAggStage.SHARE_KEYS)
        extra = set(record) - {SecAggKey.STAGE, SecAggKey.CIPHERTEXT_LIST, SecAggKey.SOURCE_LIST}
        if extra:
            protocol_error(f"collect: unexpected keys {sorted(extra)} in the SecAgg+ record")
        sources = _int_list(record.get(SecAggKey.SOURCE_LIST), "collect: srcs")
        ciphertexts = record.get(SecAggKey.CIPHERTEXT_LIST)
        if not isinstance(ciphertexts, list) or len(ciphertexts) != len(sources):
            protocol_error("collect: ctxts must be one ciphertext per source")
        if len(sources) + 1 < self.params.threshold:
            protocol_error(f"collect: shares from {len(sources)} neighbours, fewer than the threshold needs")
        for src, ciphertext in zip(sources, ciphertexts, strict=True):
            if src == self.node_id or src not in self._pairwise:
                protocol_error(f"collect: a share from node {src}, which is not a neighbour", node=src)
            if type(ciphertext) is not bytes or len(ciphertext) > MAX_CIPHERTEXT:
                protocol_error(f"collect: node {src}'s ciphertext is not bytes of a bounded size", node=src)
            try:
                plaintext = decrypt_share(self._pairwise[src], ciphertext)
            except ValueError:
                protocol_error(f"collect: node {src}'s share does not decrypt", node=src)
            actual, dst, seed_share, key_share = share_plaintext_fields(plaintext)
            if actual != src or dst != self.node_id:
                protocol_error(f"collect: a share for node {dst} from node {actual} arrived as {src}'s", node=src)
            self._seed_shares[src], self._key_shares[src] = seed_share, key_share
        self._holders = (self.node_id, *sources)
        self.stage = SecAggStage.COLLECT_MASKED_VECTORS

    def mask(self, vector: np.ndarray) -> np.ndarray:
        """vector + own mask + the pairwise masks with every neighbour whose shares arrived, mod 2^64."""
        if self.stage != SecAggStage.COLLECT_MASKED_VECTORS or self.masked_length >= 0:
            protocol_error("a masked vector is made once per round, after the shares arrived")
        if vector.dtype != np.uint64 or vector.ndim != 1:
            raise ValueError("the vector to mask is a flat uint64 array")
        length = int(vector.size)
        masked = vector.copy()
        np.add(masked, masks.private_mask(self._secret(self.__seed), length), out=masked)
        sk1 = self._secret(self.__sk1)
        for nid in self._holders[1:]:
            pairwise = masks.pairwise_mask(shared_key(sk1, self._neighbours[nid][0]), length)
            masks.apply_pairwise(masked, self.node_id, nid, pairwise)
        self.masked_length = length
        return masked

    def unmask(self, record: ConfigRecord) -> dict[str, Any]:
        """Seed shares of the survivors, first-key shares of the dropped: never both for one node,
        only for nodes whose shares this hospital holds, once, and only with enough survivors."""
        if self.stage != SecAggStage.COLLECT_MASKED_VECTORS or self.masked_length < 0:
            protocol_error("unmask before this hospital sent its masked vector")
        _exact_keys(record, {SecAggKey.STAGE, SecAggKey.ACTIVE_NODE_ID_LIST, SecAggKey.DEAD_NODE_ID_LIST},
                    SecAggStage.UNMASK)  # fmt: skip
        active = _int_list(record[SecAggKey.ACTIVE_NODE_ID_LIST], "unmask: active_nids")
        dead = _int_list(record[SecAggKey.DEAD_NODE_ID_LIST], "unmask: dead_nids")
        if set(active) & set(dead):
            protocol_error("unmask: a node is named both alive and dropped", nodes=sorted(set(active) & set(dead)))
        unknown = (set(active) | set(dead)) - set(self._holders)
        if unknown:
            protocol_error("unmask: shares asked for nodes this hospital holds none of", nodes=sorted(unknown))
        if self.node_id not in active:
            protocol_error("unmask: this hospital is named as dropped although it sent its masked vector")
        if len(active) < self.params.threshold:
            protocol_error(
                f"unmask: {len(active)} survivors, fewer than the threshold {self.params.threshold}",
                survivors=len(active),
            )
        self.stage = SecAggStage.UNMASK
        self.unmasked = {"active": sorted(active), "dead": sorted(dead)}
        shares = [self._seed_shares[n] for n in active] + [self._key_shares[n] for n in dead]
        return {SecAggKey.NODE_ID_LIST: active + dead, SecAggKey.SHARE_LIST: shares}

    def close(self) -> None:
        """The round is over (or failed): every secret is dropped."""
        self.__sk1 = self.__sk2 = self.__seed = None
        self._seed_shares, self._key_shares, self._pairwise = {}, {}, {}

    def _secrets_for_tests(self) -> list[bytes]:
        """TEST ONLY: every secret of the round (the shares it holds of its neighbours' too), to
        show that none reaches the ClientApp."""
        held = [*self._seed_shares.values(), *self._key_shares.values()]
        return [*self.own_secrets(), *held]

    def own_secrets(self) -> list[bytes]:
        """What must never appear in a reply: the private keys, the mask seed, the keys shared
        with neighbours, this hospital's own share of its first key (its own seed share leaves,
        by design, in its unmask answer)."""
        own_key_share = self._key_shares.get(self.node_id, b"")
        keys = (self.__sk1, self.__sk2, self.__seed, own_key_share, *self._pairwise.values())
        return [s for s in keys if s]


# -- the allow-list of what a stage reply may hold ---------------------------------------------------


def _only_configs(content: RecordDict, stage: str) -> ConfigRecord:
    if list(content) != [SECAGG_CONFIGS] or not isinstance(content[SECAGG_CONFIGS], ConfigRecord):
        raise GateRefusal("secagg-allow-list", f"a {stage} reply holds records {list(content)}")
    return cast(ConfigRecord, content[SECAGG_CONFIGS])


def check_stage_reply(stage: str, content: RecordDict, session: ClientSession, payload: bytes) -> None:
    """Before a stage reply is recorded and sent: exactly the records and keys its stage allows,
    each of the type and size the protocol needs, and no secret of the session in its bytes."""
    if stage == SecAggStage.COLLECT_MASKED_VECTORS:
        _check_collect(content, session)
    else:
        record = _only_configs(content, stage)
        expected = {
            SecAggStage.SETUP: {SecAggKey.PUBLIC_KEY_1, SecAggKey.PUBLIC_KEY_2},
            SecAggStage.SHARE_KEYS: {SecAggKey.DESTINATION_LIST, SecAggKey.CIPHERTEXT_LIST},
            SecAggStage.UNMASK: {SecAggKey.NODE_ID_LIST, SecAggKey.SHARE_LIST},
        }[stage]
        if set(record) != expected:
            raise GateRefusal("secagg-allow-list", f"a {stage} reply has keys {sorted(record)}")
        if stage == SecAggStage.SETUP:
            if record[SecAggKey.PUBLIC_KEY_1] != session.pk1 or record[SecAggKey.PUBLIC_KEY_2] != session.pk2:
                raise GateRefusal("secagg-allow-list", "a setup reply must carry this round's two public keys only")
        else:
            sharing = stage == SecAggStage.SHARE_KEYS
            nodes = record[SecAggKey.DESTINATION_LIST if sharing else SecAggKey.NODE_ID_LIST]
            blobs = record[SecAggKey.CIPHERTEXT_LIST if sharing else SecAggKey.SHARE_LIST]
            if not (isinstance(nodes, list) and isinstance(blobs, list) and len(nodes) == len(blobs)):
                raise GateRefusal("secagg-allow-list", f"a {stage} reply must pair each node with one value")
            if any(type(n) is not int for n in nodes) or any(type(b) is not bytes for b in blobs):
                raise GateRefusal("secagg-allow-list", f"a {stage} reply holds values of the wrong type")
            if any(len(cast(bytes, b)) > MAX_CIPHERTEXT for b in blobs) or len(nodes) > session.params.share_num:
                raise GateRefusal("secagg-allow-list", f"a {stage} reply is larger than its stage needs")
    for secret in session.own_secrets():
        if secret in payload:
            raise GateRefusal("secagg-allow-list", f"a {stage} reply contains a secret of this hospital's round")


def _check_collect(content: RecordDict, session: ClientSession) -> None:
    allowed = {
        LEGACY_FIT["res_parameters"]: ArrayRecord,
        LEGACY_FIT["res_num_examples"]: MetricRecord,
        LEGACY_FIT["res_metrics"]: ConfigRecord,
        LEGACY_FIT["res_status"]: ConfigRecord,
        SECAGG_CONFIGS: ConfigRecord,
    }
    if set(content) != set(allowed) or any(not isinstance(content[k], t) for k, t in allowed.items()):
        raise GateRefusal("secagg-allow-list", f"a masked reply holds records {sorted(content)}")
    if len(content[LEGACY_FIT["res_parameters"]]) != 0:
        raise GateRefusal("secagg-allow-list", "a masked reply carries no tensor in the clear")
    examples = content[LEGACY_FIT["res_num_examples"]]
    if list(examples) != ["num_examples"] or type(examples["num_examples"]) is not int:
        raise GateRefusal("secagg-allow-list", "num_examples must be the one integer the gate quantised")
    metrics = content[LEGACY_FIT["res_metrics"]]
    if any(type(v) not in (int, float) for v in metrics.values()):
        raise GateRefusal("secagg-allow-list", "a masked reply's metrics must be numbers")
    status = content[LEGACY_FIT["res_status"]]
    if dict(status) != {"code": 0, "message": ""}:
        raise GateRefusal("secagg-allow-list", "a masked reply's status is the gate's fixed OK")
    record = content[SECAGG_CONFIGS]
    vector = record.get(SecAggKey.MASKED_PARAMETERS)
    if list(record) != [SecAggKey.MASKED_PARAMETERS] or not isinstance(vector, list) or len(vector) != 1:
        raise GateRefusal("secagg-allow-list", "a masked reply carries exactly one masked vector")
    blob = vector[0]
    if not isinstance(blob, bytes) or len(blob) != 8 * session.masked_length:
        raise GateRefusal("secagg-allow-list", "the masked vector has the wrong size")


__all__ = ["PROTOCOL", "ClientSession", "SetupParams", "check_stage_reply", "parse_setup", "stage_of"]
