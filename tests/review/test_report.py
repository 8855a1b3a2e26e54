"""The DPO report claims only what the ledger supports: the bound in plain words, isolation per
reply and per run, refused payloads kept at the hospital, one section per run, the key it was
checked with and a signed head to keep. (In Chromium: test_report_in_chromium.py.)"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import ledgers
import pytest
from ledgers import (
    DESTINATION,
    SANDBOX_NOT_ENFORCED,
    clean,
    downgraded,
    hospital_gate,
    rejected_review,
    seam,
    tampered,
    two_runs,
    unbounded,
)
from typer.testing import CliRunner

from conftest import instruction
from fedgate.errors import LedgerError
from fedgate.gate.entries import ReplyEntry, read_entries
from fedgate.ledger.signing import PUBLIC_KEY_FILE
from fedgate.ledger.store import Ledger, SignedTreeHead
from fedgate.ledger.verify import verify_ledger
from fedgate.report.facts import DOWNGRADED, NO_ISOLATION, SANDBOX, read_facts
from fedgate.report.plots import run_figures
from fedgate.report.render import render_facts, render_report
from fedgate.report.wording import IMAGE_BITS, bits_text, what_fits
from malicious_apps import honest

OVERCLAIMS = ("no images", "no records", "no identifiers", "inf bits", "at most inf")


def text_of(html: str) -> str:
    """The report's words without markup (what a reader reads, near enough for assertions)."""
    text = re.sub(r"<(style|pre)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)).replace("&#39;", "'").replace("&amp;", "&")


def ledger_replies(hospital: Path) -> list[ReplyEntry]:
    with Ledger(hospital / "ledger", create=False) as ledger:
        return [e for e in read_entries(ledger) if isinstance(e, ReplyEntry)]


def fingerprint_of(hospital: Path) -> str:
    return verify_ledger(hospital / "ledger").key_id


def test_bits_and_what_fits_in_plain_words() -> None:
    assert bits_text(7234.4082) == "7,235 bits ≈ 905 bytes"  # an upper bound: rounded up
    assert bits_text(1.0) == "1 bit (under 1 byte)"
    assert bits_text(math.inf) == "no bound (unbounded)"
    assert "24 patient identifiers" in what_fits(7234.4)
    assert "22.1% of one 64×64 8-bit image (32,768 bits)" in what_fits(7234.4)
    assert "3 complete 64×64 8-bit images" in what_fits(3 * IMAGE_BITS + 1)
    assert "less than one patient identifier" in what_fits(21)
    assert "no bound" in what_fits(math.inf).lower()


def test_a_clean_run_states_its_bound_isolation_and_what_was_kept(tmp_path: Path) -> None:
    hospital = clean(tmp_path)
    replies = ledger_replies(hospital)
    facts = read_facts(hospital, fingerprint=fingerprint_of(hospital))
    [run] = facts.runs
    assert run.max_bits_per_reply == max(r.bits for r in replies)  # the figures are the ledger's
    assert run.total_bits == pytest.approx(sum(r.bits for r in replies))
    assert run.isolation_counts == {SANDBOX: 7} and not run.not_isolated and not run.unbounded
    assert run.sent_bytes == sum(r.payload_size for r in replies if r.sent)
    assert run.kept_bytes == sum(r.payload_size for r in replies if not r.sent) > 0
    html = render_facts(facts)
    text = text_of(html)
    per_reply, total = bits_text(run.max_bits_per_reply), bits_text(run.total_bits)
    assert f"At most {per_reply} of any content per reply, {total} over the run" in text
    assert "room for about" in text and "patient identifiers (~300 bits each)" in text
    assert "6 replies left hospital-0 for " + DESTINATION in text
    assert "1 reply was refused and kept at the hospital, never sent" in text
    assert "REFUSED (config-record): kept at the hospital" in text and f"{replies[-1].payload_size:,} kept" in text
    assert f"{replies[-1].payload_size:,} left" not in text  # refused bytes never shown as leaving
    assert 'id="warnings"' not in html and 'id="key-pin"' not in html  # clean, and the key was pinned
    for claim in OVERCLAIMS:
        assert claim not in text.lower()
    assert "This is a bound on what could have been encoded, not a finding that no personal data left" in text
    assert "conv.weight" in text  # the tensors by name, in the GDPR record


def test_without_a_pinned_key_the_report_says_so(tmp_path: Path) -> None:
    hospital = clean(tmp_path, rounds=1)
    facts = read_facts(hospital)
    assert facts.verification.verified and not facts.verification.pinned
    html = render_facts(facts)
    assert 'id="key-pin"' in html and "Key not pinned" in html
    assert facts.verification.fingerprint in text_of(html)
    pem = (hospital / "ledger" / PUBLIC_KEY_FILE).read_bytes()
    assert read_facts(hospital, public_key=pem).verification.pinned


def test_a_fingerprint_that_does_not_match_is_a_red_first_line(tmp_path: Path) -> None:
    hospital = clean(tmp_path, rounds=1)
    html = render_report(hospital, fingerprint="ab" * 32)
    body = html.split("<body>")[1].lstrip()
    assert body.startswith('<p class="tampered" id="verification">')
    assert "not the pinned" in text_of(body)[:600]
    with pytest.raises(LedgerError, match="not a key fingerprint"):
        read_facts(hospital, fingerprint="not-hex")  # the caller's typo is an error, not a verdict


def test_a_tampered_ledger_is_announced_in_the_first_line_and_embeds_no_head(tmp_path: Path) -> None:
    hospital = tampered(tmp_path)
    html = render_report(hospital, fingerprint=fingerprint_of_unverified(hospital))
    body = html.split("<body>")[1].lstrip()
    assert body.startswith('<p class="tampered" id="verification">WARNING: this ledger does NOT verify')
    assert "first broken entry: 2" in body[:800]
    assert 'id="trusted-head"' not in html and "No signed tree head to keep" in html


def fingerprint_of_unverified(hospital: Path) -> str:
    from fedgate.ledger.signing import Verifier

    return Verifier.from_pem((hospital / "ledger" / PUBLIC_KEY_FILE).read_bytes()).key_id


def test_the_embedded_head_is_the_next_trusted_head_and_catches_a_rollback(tmp_path: Path) -> None:
    gate = hospital_gate(tmp_path)
    seam(gate, instruction(server_round=1), honest)
    gate.close()
    hospital = tmp_path / "hospital-0"
    earlier = tmp_path / "ledger-copy"
    shutil.copytree(hospital / "ledger", earlier)  # what someone keeps to roll the ledger back to
    gate = hospital_gate(tmp_path)
    seam(gate, instruction(server_round=2), honest)
    gate.close()
    html = render_report(hospital)
    head_json = html.split('<pre id="trusted-head">')[1].split("</pre>")[0]
    assert "--trusted-head head.json" in text_of(html)
    head = SignedTreeHead.from_json(json.loads(head_json.replace("&#34;", '"')))
    assert head == verify_ledger(hospital / "ledger").latest_head
    assert read_facts(hospital, trusted_head=head).verification.verified

    shutil.rmtree(hospital / "ledger")
    shutil.copytree(earlier, hospital / "ledger")  # rolled back: consistent, signed, and one reply shorter
    assert read_facts(hospital).verification.verified  # alone, a rollback looks fine ...
    rolled_back = read_facts(hospital, trusted_head=head)  # ... but not against the head kept from the report
    assert not rolled_back.verification.verified and "truncated" in rolled_back.verification.message


def test_z_zero_is_unbounded_with_a_red_banner_never_infinite_bits(tmp_path: Path) -> None:
    hospital = unbounded(tmp_path)
    facts = read_facts(hospital)
    [run] = facts.runs
    assert run.unbounded and run.unbounded_sent == 2
    html = render_facts(facts)
    text = text_of(html)
    assert 'id="warnings"' in html and "UNBOUNDED" in text and "z = 0" in text
    assert "there is NO bound on what could have left" in text
    assert "clipped but not noised" in text and "clipped and noised" not in text
    for claim in OVERCLAIMS:
        assert claim not in text.lower()
    [bound] = [f for f in run_figures(run) if f.key == "bound"]
    assert not bound.uri and "Unbounded" in bound.skipped


@pytest.mark.parametrize(
    "isolation", [ledgers.DOWNGRADED, SANDBOX_NOT_ENFORCED], ids=["mode-downgraded", "sandbox-not-enforced"]
)
def test_a_downgraded_sandbox_gets_a_red_banner(tmp_path: Path, isolation: dict[str, Any]) -> None:
    hospital = downgraded(tmp_path, isolation)
    facts = read_facts(hospital)
    [run] = facts.runs
    assert run.isolation_counts == {DOWNGRADED: 2}
    text = text_of(render_facts(facts))
    assert "SANDBOX DOWNGRADED for 2 replies" in text and "It does NOT hold for the 2 replies" in text


def test_two_runs_in_one_folder_get_one_section_each(tmp_path: Path) -> None:
    hospital = two_runs(tmp_path)
    facts = read_facts(hospital)
    assert [r.run_id for r in facts.runs] == [1001, 2002]
    first, second = facts.runs
    assert len(first.replies) == 5 and len(second.replies) == 2
    assert second.isolation_counts == {NO_ISOLATION: 2} and not first.not_isolated
    html = render_facts(facts)
    assert html.count('<section class="run"') == 2
    one, two = html.split('<section class="run" id="run-1001">')[1].split('<section class="run" id="run-2002">')
    assert "NOT ISOLATED" not in one and "Run 2002: NOT ISOLATED — 2 replies were produced without isolation" in two
    assert first.total_bits == pytest.approx(sum(r.bits for r in first.replies))  # not mixed with run 2002
    assert html.count("<th>policy hash</th>") == 2 and html.count("<th>dates (UTC)</th>") == 2


def test_a_rejected_review_is_shown_as_refused_and_kept(tmp_path: Path) -> None:
    hospital = rejected_review(tmp_path)
    facts = read_facts(hospital)
    [run] = facts.runs
    [review] = run.reviews
    assert (review.status, review.reviewer) == ("rejected", "Dr Grace Hopper")
    [reply] = run.replies
    assert not reply.sent and reply.rule == "review-rejected"
    text = text_of(render_facts(facts))
    assert "Nothing left hospital-0" in text and "REFUSED (review-rejected): kept at the hospital" in text
    assert "Nothing: every reply was refused" in text
    [figure] = [f for f in run_figures(run) if f.key == "bytes"]
    assert not figure.uri and "No reply left" in figure.skipped  # no empty axes


def test_the_per_patient_epsilon_leads_with_the_enforced_figure_and_shows_claims_apart(tmp_path: Path) -> None:
    import dataclasses

    from fedgate.report.privacy import PrivacyFacts

    facts = read_facts(clean(tmp_path, rounds=1))
    assert facts.privacy is not None and facts.privacy.modes == ("gated",)
    html = text_of(render_facts(facts))
    assert "no meaningful guarantee" in html  # the shipped gate noise alone: a huge ε, said plainly
    trusted = PrivacyFacts(seq=5, delta=1e-5, record_level=7.97, hospital_level=10680.0, record_accountant="pld",
                           hospital_accountant="gaussian", library="dp-accounting 0.6.0", modes=("trusted",),
                           claimed={"epsilon": "0.5"})  # fmt: skip
    html = text_of(render_facts(dataclasses.replace(facts, privacy=trusted)))
    assert "Per patient, ε = 7.97" in html and "96.7% sure" in html  # e^7.97 x 1/99 odds, as a probability
    assert "Claimed, not enforced" in html and "epsilon = 0.5" in html
    assert html.index("Per patient, ε = 7.97") < html.index("Claimed, not enforced")
    nothing = dataclasses.replace(facts, privacy=None)
    assert 'id="privacy-slot"' in render_facts(nothing)


def test_report_command_pins_the_key_and_writes_the_file(tmp_path: Path) -> None:
    from fedgate.cli.main import app

    hospital = clean(tmp_path, rounds=1)
    out = tmp_path / "r.html"
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(hospital), "-o", str(out), "--fingerprint", fingerprint_of(hospital)])
    assert result.exit_code == 0, result.output
    assert "ledger verifies" in result.output and 'id="key-pin"' not in out.read_text()
    head = tmp_path / "head.json"
    head.write_text(out.read_text().split('<pre id="trusted-head">')[1].split("</pre>")[0].replace("&#34;", '"'))
    result = runner.invoke(app, ["report", str(hospital), "-o", str(out), "--trusted-head", str(head)])
    assert result.exit_code == 0, result.output
    assert "key not pinned" in result.output and 'id="key-pin"' in out.read_text()
    assert "still contains the trusted head" in out.read_text()
    tampered_hospital = tampered(tmp_path / "other")
    result = runner.invoke(app, ["report", str(tampered_hospital), "-o", str(out)])
    assert result.exit_code == 1 and "LEDGER DOES NOT VERIFY" in result.output  # a script notices
    assert "does NOT verify" in out.read_text()
    result = runner.invoke(app, ["report", str(tmp_path / "nothing"), "-o", str(out)])
    assert result.exit_code != 0 and "holds no ledger" in str(result.exception)
