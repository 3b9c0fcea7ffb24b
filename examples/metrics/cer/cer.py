# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
"""Character error rate, an `evaluate` metric module shipped with the hf_fadam examples (loaded by path, offline).

The same inputs and output as the Hub's `cer` (`evaluate.load("cer")`): `compute(predictions=[...],
references=[...])` returns a float,

    CER = (S + D + I) / N

summed over all pairs, where S, D and I are the character substitutions, deletions and insertions of the minimum
edit (Levenshtein) alignment of each prediction to its reference and N = S + D + H is the number of reference
characters. Spaces count as characters; runs of whitespace are first collapsed to one space and the ends stripped,
as the Hub module does. An empty reference is allowed: its prediction's characters count as insertions and it adds
nothing to N. The alignment is jiwer's (`jiwer.process_characters`), which works with jiwer 3 and 4.
"""

import datasets
import evaluate
import jiwer


_DESCRIPTION = "Character error rate: (substitutions + deletions + insertions) / reference characters, over all pairs."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): transcripts to score.
    references (`list[str]`): the reference transcripts, one per prediction.
    concatenate_texts (`bool`, defaults to `False`): score the texts joined by spaces instead of pair by pair.
Returns:
    `float`: the character error rate (0 is perfect; it can exceed 1 when there are many insertions).
Example:
    >>> cer = evaluate.load("examples/metrics/cer")
    >>> cer.compute(predictions=["this is the prediction"], references=["this is the reference"])
    0.38095238095238093
"""

_CITATION = """@inproceedings{morris2004wer,
  title     = {From {WER} and {RIL} to {MER} and {WIL}: improved evaluation measures for connected speech recognition},
  author    = {Morris, Andrew Cameron and Maier, Viktoria and Green, Phil},
  booktitle = {Interspeech},
  year      = {2004}
}"""


def character_errors(predictions, references):
    """Return (S + D + I, N) over characters, summed over the pairs, after collapsing whitespace."""
    predictions = [" ".join(p.split()) for p in predictions]
    references = [" ".join(r.split()) for r in references]
    errors = sum(len(p) for r, p in zip(references, predictions) if not r)
    pairs = [(r, p) for r, p in zip(references, predictions) if r]
    total = 0
    if pairs:
        output = jiwer.process_characters([r for r, _ in pairs], [p for _, p in pairs])
        errors += output.substitutions + output.deletions + output.insertions
        total += output.substitutions + output.deletions + output.hits
    return errors, total


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CER(evaluate.Metric):
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
        errors, total = character_errors(predictions, references)
        if total == 0:
            raise ValueError("references hold no characters: the character error rate is undefined")
        return errors / total
