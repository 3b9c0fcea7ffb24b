# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
"""Word error rate, an `evaluate` metric module shipped with the hf_fadam examples (loaded by path, offline).

The same inputs and output as the Hub's `wer` (`evaluate.load("wer")`): `compute(predictions=[...],
references=[...])` returns a float,

    WER = (S + D + I) / N

summed over all pairs, where S, D and I are the word substitutions, deletions and insertions of the minimum edit
(Levenshtein) alignment of each prediction to its reference and N = S + D + H is the number of reference words
(H = hits). With `concatenate_texts=True` the pairs are joined into one text first (the same number).

Words are split on whitespace; no other normalisation is done (lower-case and strip punctuation before, if you want
it). Unlike the Hub module, an empty reference is allowed: its prediction's words count as insertions and it adds
nothing to N. The alignment is jiwer's (`jiwer.process_words`), which works with jiwer 3 and 4.
"""

import datasets
import evaluate
import jiwer


_DESCRIPTION = "Word error rate: (substitutions + deletions + insertions) / reference words, over all pairs."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): transcripts to score.
    references (`list[str]`): the reference transcripts, one per prediction.
    concatenate_texts (`bool`, defaults to `False`): score the joined texts instead of pair by pair (same value).
Returns:
    `float`: the word error rate (0 is perfect; it can exceed 1 when there are many insertions).
Example:
    >>> wer = evaluate.load("examples/metrics/wer")
    >>> wer.compute(predictions=["this is the prediction"], references=["this is the reference"])
    0.25
"""

_CITATION = """@inproceedings{morris2004wer,
  title     = {From {WER} and {RIL} to {MER} and {WIL}: improved evaluation measures for connected speech recognition},
  author    = {Morris, Andrew Cameron and Maier, Viktoria and Green, Phil},
  booktitle = {Interspeech},
  year      = {2004}
}"""


def word_errors(predictions, references):
    """Return (S + D + I, N) summed over the pairs, counting an empty reference's words as insertions."""
    errors, total = 0, 0
    pairs = [(r, p) for r, p in zip(references, predictions) if r.split()]
    for reference, prediction in zip(references, predictions):
        if not reference.split():
            errors += len(prediction.split())
    if pairs:
        output = jiwer.process_words([r for r, _ in pairs], [p for _, p in pairs])
        errors += output.substitutions + output.deletions + output.insertions
        total += output.substitutions + output.deletions + output.hits
    return errors, total


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WER(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string", id="sequence"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://en.wikipedia.org/wiki/Word_error_rate", "https://github.com/jitsi/jiwer/"],
        )

    def _compute(self, predictions=None, references=None, concatenate_texts=False):
        if len(predictions) != len(references):
            raise ValueError(f"predictions has {len(predictions)} texts but references has {len(references)}")
        if concatenate_texts:
            predictions, references = [" ".join(predictions)], [" ".join(references)]
        errors, total = word_errors(predictions, references)
        if total == 0:
            raise ValueError("references hold no words: the word error rate is undefined")
        return errors / total
