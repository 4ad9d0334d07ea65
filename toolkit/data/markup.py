"""Special tokens and image markup: plain string constants, importable without transformers or torch.

Markup follows LongLLaVA (arXiv 2409.02889): each image is written ``<img><image></img>``, a video ``<vid>``
frames separated by ``<t>`` ``</vid>``. These are the default layout's markers (``data.template.layout``
selects another layout or other markers: ``toolkit.data.template.Layout``). ``<image>`` is a placeholder the
collator expands into as many copies of its id as the image produces tokens (``toolkit.data.collate``). The
tokenizer (``toolkit.data.tokenizer``) and the prompt templates (``toolkit.data.template``) both read these
names from here, so neither imports the other.
"""

from __future__ import annotations

PAD = "<pad>"
BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
IMAGE = "<image>"  # placeholder, expanded to the image's tokens by the collator
IMG_START = "<img>"
IMG_END = "</img>"
VID_START = "<vid>"
VID_END = "</vid>"
FRAME_SEP = "<t>"

# Fixed order: the word-level tokenizer gives these ids 0..9.
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE, IMG_START, IMG_END, VID_START, VID_END, FRAME_SEP)
# The markup every tokenizer must know as one unsplittable token each.
MARKUP_TOKENS = (IMAGE, IMG_START, IMG_END, VID_START, VID_END, FRAME_SEP)
