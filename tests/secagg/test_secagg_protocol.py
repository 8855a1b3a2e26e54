"""The gate's side of SecAgg+, stage by stage, against a server that does not follow the script."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedgate.errors import GateRefusal
from fedgate.flower_adapter import SECAGG_CONFIGS, combine_shares, recorddict_to_bytes
from fedgate.secagg import SecAggPolicy, masks
from fedgate.secagg.encoding import DEFAULT_STEP_LOG2
from fedgate.secagg.protocol import (
    KEY_MODULUS,
    KEY_PRG,
    KEY_PROTOCOL,
    KEY_STEP,
    PROTOCOL,
    ClientSession,
    check_stage_reply,
    parse_setup,
)

POLICY = SecAggPolicy(enabled=True, threshold=3, assumed_honest=3)
NODES = [11, 22, 33, 44]


def setup_record(**changes: Any) -> ConfigRecord:
    values: dict[str, Any] = {
        "stage": "setup", "sample_num": 4, "share_num": 4, "threshold": 3, "clipping_range": 8.0,
        "target_range": 1 << 22, "mod_range": 1 << 32, "max_weight": 1000.0,
        KEY_PROTOCOL: PROTOCOL, KEY_PRG: masks.PRG, KEY_STEP: DEFAULT_STEP_LOG2, KEY_MODULUS: 64,
    }  # fmt: skip
    values.update(changes)
    return ConfigRecord({k: v for k, v in values.items() if v is not None})


def round_at_collect(nodes: list[int] = NODES) -> dict[int, ClientSession]:
    """Sessions of `nodes`, with keys shared and each one's shares delivered, as an honest server does."""
    sessions = {n: ClientSession.start(parse_setup(setup_record(), n, "1", POLICY)) for n in nodes}
    keys = {str(n): [s.pk1, s.pk2] for n, s in sessions.items()}
    outgoing = {n: s.share_keys(ConfigRecord({"stage": "share_keys", **keys})) for n, s in sessions.items()}  # type: ignore[dict-item]
    for n, session in sessions.items():
        srcs = [src for src, out in outgoing.items() if n in out["dsts"]]
        ctxts = [outgoing[src]["ctxts"][outgoing[src]["dsts"].index(n)] for src in srcs]
        session.receive_shares(ConfigRecord({"stage": "collect_masked_vectors", "srcs": srcs, "ctxts": ctxts}))
    return sessions


def unmask(session: ClientSession, active: list[int], dead: list[int]) -> dict[str, Any]:
    record = ConfigRecord({"stage": "unmask", "active_nids": active, "dead_nids": dead})
    return session.unmask(record)


def test_masks_cancel_and_the_seeds_come_back_from_the_shares() -> None:
    sessions = round_at_collect()
    vectors = {n: np.arange(50, dtype=np.int64).view(np.uint64) * np.uint64(n) for n in NODES}
    masked = {n: sessions[n].mask(vectors[n]) for n in NODES}
    total = np.zeros(50, dtype=np.uint64)
    for vector in masked.values():
        np.add(total, vector, out=total)
    answers = {n: unmask(s, NODES, []) for n, s in sessions.items()}
    for owner in NODES:  # the server removes each survivor's own mask from 3 of its shares
        shares = [a["shares"][a["nids"].index(owner)] for a in list(answers.values())[:3]]
        np.subtract(total, masks.private_mask(combine_shares(shares), 50), out=total)
    assert total.tolist() == sum(vectors.values()).tolist()  # type: ignore[union-attr]
    assert all(masked[n].tolist() != vectors[n].tolist() for n in NODES)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({KEY_PROTOCOL: None, KEY_PRG: None, KEY_STEP: None, KEY_MODULUS: None}, "MT19937"),
        ({KEY_PRG: "mt19937/32-bit-seed"}, "not fedgate's"),
        ({"threshold": 2}, "below this hospital's secagg.threshold"),
        ({"share_num": 5}, "not a valid round"),
        ({KEY_STEP: -80}, "outside"),
        ({"extra": 1}, "extra"),
        ({"sample_num": 4.0}, "must be int"),
    ],
)
def test_setup_is_refused_unless_it_is_fedgate_s_protocol_at_the_policy_s_threshold(
    changes: dict[str, Any], match: str
) -> None:
    with pytest.raises(GateRefusal, match=match) as err:
        parse_setup(setup_record(**changes), 11, "1", POLICY)
    assert err.value.rule == "secagg-protocol"


def test_a_threshold_that_is_not_a_majority_of_the_shares_is_refused_whatever_the_policy() -> None:
    """With t = 2 of 4 shares, a server that tells two neighbours "11 dropped" and the other two
    "11 survived" gets 2 shares of 11's first key and 2 of its mask seed: 11's vector unmasked."""
    permissive = SecAggPolicy(enabled=True, threshold=2, assumed_honest=2)
    parse_setup(setup_record(share_num=3, sample_num=4, threshold=2), 11, "1", permissive)  # 2 of 3: a majority
    with pytest.raises(GateRefusal, match="not a majority of the 4 shares"):
        parse_setup(setup_record(threshold=2), 11, "1", permissive)


def test_share_keys_refuses_altered_own_keys_and_duplicate_or_broken_keys() -> None:
    sessions = {n: ClientSession.start(parse_setup(setup_record(), n, "1", POLICY)) for n in NODES}
    keys: dict[str, Any] = {str(n): [s.pk1, s.pk2] for n, s in sessions.items()}
    mine = sessions[11]
    for bad, match in [
        ({**keys, "11": [sessions[22].pk1, mine.pk2]}, "own public keys"),
        ({**keys, "44": [sessions[33].pk1, sessions[33].pk2]}, "share a public key"),
        ({**keys, "44": [b"x" * 215, sessions[44].pk2]}, "does not parse"),
        ({"11": keys["11"], "22": keys["22"]}, "threshold 3"),
        ({**{k: v for k, v in keys.items() if k != "44"}, "node-5": keys["44"]}, "not a node id"),
        ({**keys, "55": keys["22"]}, "5 neighbours for 4 shares"),
    ]:
        with pytest.raises(GateRefusal, match=match):
            mine.share_keys(ConfigRecord({"stage": "share_keys", **bad}))


def test_stages_out_of_order_are_refused() -> None:
    session = ClientSession.start(parse_setup(setup_record(), 11, "1", POLICY))
    with pytest.raises(GateRefusal, match="out of order"):
        session.receive_shares(ConfigRecord({"stage": "collect_masked_vectors", "srcs": [], "ctxts": []}))
    with pytest.raises(GateRefusal, match="before this hospital sent"):
        unmask(session, NODES, [])
    with pytest.raises(GateRefusal, match="once per round"):
        session.mask(np.zeros(3, dtype=np.uint64))


def test_a_share_from_a_stranger_a_forged_or_a_misdirected_one_is_refused() -> None:
    for case in ("stranger", "forged", "misdirected"):
        sessions = {n: ClientSession.start(parse_setup(setup_record(), n, "1", POLICY)) for n in NODES}
        keys: dict[str, Any] = {str(n): [s.pk1, s.pk2] for n, s in sessions.items()}
        out = {n: s.share_keys(ConfigRecord({"stage": "share_keys", **keys})) for n, s in sessions.items()}
        for_33 = out[22]["ctxts"][out[22]["dsts"].index(33)]
        srcs, ctxts = {"stranger": ([99], [for_33]), "forged": ([22], [b"not-fernet"]),
                       "misdirected": ([22], [for_33])}[case]  # fmt: skip
        for src in (33, 44):  # enough honest shares that only the bad one can be the reason
            srcs, ctxts = [src, *srcs], [out[src]["ctxts"][out[src]["dsts"].index(11)], *ctxts]
        with pytest.raises(GateRefusal, match=r"not a neighbour|does not decrypt"):
            sessions[11].receive_shares(ConfigRecord({"stage": "collect_masked_vectors", "srcs": srcs, "ctxts": ctxts}))


@pytest.mark.parametrize(
    ("active", "dead", "match"),
    [
        ([11, 22, 33], [33, 44], "both alive and dropped"),
        ([11, 22, 33, 55], [], "holds none of"),
        ([22, 33, 44], [11], "named as dropped"),
        ([11, 22], [33, 44], "fewer than the threshold"),
    ],
)
def test_unmask_never_reveals_both_secrets_of_a_node_or_unmasks_too_few(
    active: list[int], dead: list[int], match: str
) -> None:
    session = round_at_collect()[11]
    session.mask(np.zeros(4, dtype=np.uint64))
    with pytest.raises(GateRefusal, match=match):
        unmask(session, active, dead)


def test_unmask_is_answered_once() -> None:
    session = round_at_collect()[11]
    session.mask(np.zeros(4, dtype=np.uint64))
    answer = unmask(session, [11, 22, 33], [44])
    assert answer["nids"] == [11, 22, 33, 44] and len(answer["shares"]) == 4
    with pytest.raises(GateRefusal, match=r"before this hospital sent|out of order|once"):
        unmask(session, [11, 22, 33], [44])


def test_the_allow_list_stops_a_reply_that_holds_a_secret_or_an_extra_key() -> None:
    session = round_at_collect()[11]
    leaked = RecordDict({SECAGG_CONFIGS: ConfigRecord({"pk1": session.pk1, "pk2": session.own_secrets()[0]})})
    with pytest.raises(GateRefusal, match=r"this round's two public keys|secret"):
        check_stage_reply("setup", leaked, session, recorddict_to_bytes(leaked))
    sneaky = RecordDict({SECAGG_CONFIGS: ConfigRecord({"pk1": session.pk1, "pk2": session.pk2, "note": "hello"})})
    with pytest.raises(GateRefusal, match="keys"):
        check_stage_reply("setup", sneaky, session, recorddict_to_bytes(sneaky))
    honest = RecordDict({SECAGG_CONFIGS: ConfigRecord({"pk1": session.pk1, "pk2": session.pk2})})
    check_stage_reply("setup", honest, session, recorddict_to_bytes(honest))
    for secret in session.own_secrets():  # whatever the bytes, no secret of the round may be in them
        with pytest.raises(GateRefusal, match="secret"):
            check_stage_reply("setup", honest, session, recorddict_to_bytes(honest) + secret)


def test_a_closed_session_has_no_secrets_and_cannot_be_pickled() -> None:
    import pickle

    session = round_at_collect()[11]
    with pytest.raises(TypeError):
        pickle.dumps(session)
    session.close()
    assert session.own_secrets() == [] and session._secrets_for_tests() == []
    with pytest.raises(GateRefusal):
        session.mask(np.zeros(2, dtype=np.uint64))
