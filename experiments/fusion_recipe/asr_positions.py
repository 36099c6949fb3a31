"""Where in a transcript the ASR errors fall (eighteenth round).

    python asr_positions.py RUN/fusion ...                      # fused models' test answers
    python asr_positions.py --ctc SPEECH.ckpt [--encoder FUSION.ckpt]   # the CTC head instead
    python asr_positions.py --adapter FUSION.ckpt               # the adapter's tokens (r19)

For each run: WER, the error rate of the words by their place from the end of the reference
(-1: the last word), the share of all word errors that fall in the last two words, and the
clips misread among those whose reference says a word twice in a row and among the others
(twenty-second round).
Words are aligned with difflib; an insertion counts against the reference word it precedes.
`--ctc` transcribes the embedded corpus's test clips with a speech-stage checkpoint's CTC
head, optionally over the speech encoder of a fusion checkpoint. `--adapter` reads a fusion
checkpoint's speech adapter as the auxiliary CTC loss trains it (model.speech_ctc_weight):
each 80 ms embedding becomes the token whose decoder embedding is the most similar (cosine),
repeats are merged and the <|speech|> blank dropped.
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections import Counter
from pathlib import Path

from herd.data.digits_tasks import says_a_word_twice


def position_errors(pairs: list[tuple[str, str]]) -> tuple[float, dict[int, float], float]:
    """[(reference, hypothesis)] -> (WER, {place from the end: error rate}, share in last two)."""
    wrong_at, words_at = Counter(), Counter()
    errors = last_two = 0
    for reference, hypothesis in pairs:
        ref, hyp = reference.split(), hypothesis.split()
        n, wrong = len(ref), set()
        matcher = difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False)
        for op, i1, i2, j1, j2 in matcher.get_opcodes():
            if op == "equal":
                continue
            count = max(i2 - i1, j2 - j1)
            errors += count
            last_two += count if i1 >= n - 2 else max(0, i2 - (n - 2))
            wrong.update(range(i1, i2) if i2 > i1 else [min(i1, n - 1)])
        for i in range(n):
            words_at[i - n] += 1
            wrong_at[i - n] += i in wrong
    total = sum(words_at.values())
    rates = {k: wrong_at[k] / words_at[k] for k in sorted(words_at) if k >= -6}
    return errors / total, rates, last_two / max(1, errors)


def clips_wrong_by_repeat(pairs: list[tuple[str, str]]) -> list[tuple[int, int]]:
    """[(clips misread, clips)] among those that say a word twice in a row, then the others:
    a copy that loses count shows in the first."""
    groups = (
        [p for p in pairs if says_a_word_twice(p[0])],
        [p for p in pairs if not says_a_word_twice(p[0])],
    )
    return [(sum(r.split() != h.split() for r, h in group), len(group)) for group in groups]


def fused_pairs(run: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (run / "test_predictions.jsonl").open()]
    return [(r["reference"], r["prediction"]) for r in rows if r["task"] == "asr"]


def test_pairs(transcribe) -> list[tuple[str, str]]:
    """[(reference, transcribe(waveform [S]))] over the embedded corpus's test clips."""
    import torch

    from herd.data.digits_tasks import speech_examples
    from herd.data.speech import DIGITS_MANIFEST

    with torch.no_grad():
        examples = speech_examples(DIGITS_MANIFEST, "test", ("asr",))
        return [(example.answer, transcribe(example.audio[0])) for example in examples]


def ctc_pairs(speech_ckpt: str, encoder_ckpt: str | None) -> list[tuple[str, str]]:
    import torch

    from herd.systems.common import load_system

    system = load_system(speech_ckpt).eval()
    if encoder_ckpt:
        fused = load_system(encoder_ckpt)
        system.model.load_state_dict(fused.model.speech_encoder.state_dict())
    return test_pairs(lambda audio: system.transcribe(audio[None], torch.tensor([len(audio)]))[0])


def adapter_pairs(fusion_ckpt: str) -> list[tuple[str, str]]:
    import torch
    import torch.nn.functional as F

    from herd.systems.common import load_system
    from herd.systems.speech import ctc_greedy_decode

    system = load_system(fusion_ckpt).eval()
    model = system.model
    table = F.normalize(model.decoder.embed_tokens.weight, dim=-1)  # [V, D]

    def transcribe(audio: torch.Tensor) -> str:
        speech, lengths = model.encode_speech(audio[None, None], torch.tensor([[len(audio)]]))
        similarity = F.normalize(speech, dim=-1) @ table.T  # [1, L, V]: argmax as log-probs
        ids = ctc_greedy_decode(similarity, lengths, blank_id=model.speech_token_id)[0]
        return system.tokenizer.decode(ids).strip()

    return test_pairs(transcribe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="fusion run directories")
    parser.add_argument("--ctc", help="a speech-stage checkpoint: score its CTC transcripts")
    parser.add_argument(
        "--encoder", help="with --ctc: the speech encoder of this fusion checkpoint"
    )
    parser.add_argument("--adapter", help="a fusion checkpoint: score its adapter's tokens")
    args = parser.parse_args()
    sources = [(str(run), fused_pairs(run)) for run in args.runs]
    if args.ctc:
        sources.append((f"CTC {args.ctc} {args.encoder or ''}", ctc_pairs(args.ctc, args.encoder)))
    if args.adapter:
        sources.append((f"adapter {args.adapter}", adapter_pairs(args.adapter)))
    for name, pairs in sources:
        wer, rates, share = position_errors(pairs)
        by_place = "  ".join(f"{k}: {v:.2f}" for k, v in rates.items())
        (rep_wrong, rep_n), (other_wrong, other_n) = clips_wrong_by_repeat(pairs)
        print(
            f"{name}: {len(pairs)} clips, WER {wer:.3f}; by place {by_place}; last two "
            f"{share:.2f}; clips misread: {rep_wrong}/{rep_n} that say a word twice in a row, "
            f"{other_wrong}/{other_n} others"
        )


if __name__ == "__main__":
    main()
