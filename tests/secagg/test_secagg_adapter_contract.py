"""The Flower internals fedgate's SecAgg+ relies on (all imported in `fedgate.flower_adapter`):
if an upgrade moves or changes them, this fails first, and loudly."""

from __future__ import annotations

import dataclasses

import numpy as np
from flwr.common import FitIns, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.common.typing import Code
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, fitres_to_recorddict
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedgate import flower_adapter as adapter


def test_stage_and_key_names_are_flower_s() -> None:
    assert tuple(Stage.all()) == adapter.SecAggStage.ALL
    for name, value in vars(adapter.SecAggKey).items():
        if not name.startswith("_"):
            assert getattr(Key, name) == value


def test_the_legacy_layout_is_flower_s() -> None:
    fitins = fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(2)]), {}), True)
    assert set(fitins) == {adapter.LEGACY_FIT["ins_parameters"], adapter.LEGACY_FIT["ins_config"]}
    fitres = fitres_to_recorddict(FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), 1, {}), True)
    assert set(fitres) == {adapter.LEGACY_FIT[k] for k in ("res_parameters", "res_num_examples", "res_metrics",
                                                            "res_status")}  # fmt: skip


def test_key_exchange_and_shares_interoperate_with_flower_s() -> None:
    sk_a, pk_a = adapter.new_key_pair()
    sk_b, pk_b = adapter.new_key_pair()
    ours = adapter.shared_key(sk_a, pk_b)
    assert ours == adapter.shared_key(sk_b, pk_a)
    assert ours == generate_shared_key(bytes_to_private_key(sk_a), bytes_to_public_key(pk_b))
    token = adapter.encrypt_share(ours, adapter.share_plaintext(1, 2, b"seed-share", b"key-share"))
    assert adapter.share_plaintext_fields(adapter.decrypt_share(ours, token)) == (1, 2, b"seed-share", b"key-share")
    shares = adapter.create_shares(b"s" * 32, 3, 5)
    assert adapter.combine_shares(shares[1:4]) == b"s" * 32


def test_the_server_workflow_internals_are_where_fedgate_s_workflow_expects_them() -> None:
    flower = adapter.LegacyServer()
    fields = {f.name for f in dataclasses.fields(flower.WorkflowState)}
    assert {"nid_to_fitins", "nid_to_proxies", "sampled_node_ids", "active_node_ids", "threshold",
            "nid_to_neighbours", "nid_to_publickeys", "forward_srcs", "forward_ciphertexts",
            "aggregate_ndarrays", "legacy_results", "failures"} <= fields  # fmt: skip
    for method in ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage",
                   "_check_threshold"):  # fmt: skip
        assert callable(getattr(flower.SecAggPlusWorkflow, method))
    assert flower.MAIN_PARAMS_RECORD == "parameters" and flower.CURRENT_ROUND == "current_round"
