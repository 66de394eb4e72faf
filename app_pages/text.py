"""User text inside Streamlit Markdown, shown literally.

Category names, identities, file paths and error messages come from users. Every Streamlit
element that takes a string renders it as Markdown (st.markdown, caption, info/error, header,
widget labels, help, metric label *and value*, radio options, expander and tab labels, toast,
image captions); selectbox options, st.text, st.code and dataframe cells are plain text.
Wrap user text with :func:`md_escape` (or :func:`code`) in the first group, never the second.
"""

from __future__ import annotations

import re
import string

# U+2060 WORD JOINER: invisible, and not a word character. Some constructs are found in the text
# after the Markdown is parsed, so a backslash escape does not stop them: GFM's bare links
# (http://..., www.x, a@b.c), Streamlit's :streamlit: logo and its arrows and dashes (-> <- <-> --
# >= <= ~=). A joiner after ":" and "@", between "www" and ".", and inside those arrows breaks them
# without changing what a reader sees.
_JOINER = "\u2060"
_NEEDS_JOINER = re.compile(r"[:@]|(?i:www)(?=\.)|[<>~-](?=[-<>=])")
_ESCAPE = str.maketrans({c: "\\" + c for c in string.punctuation})  # every ASCII punctuation CommonMark escapes
_BACKTICKS = re.compile(r"`+")


def md_escape(text: object) -> str:
    """``str(text)`` as Markdown that Streamlit shows character for character: no links, images,
    emphasis, HTML, LaTeX ($), colours (:red[...]), icons (:material/...:) or emoji shortcodes."""
    return _NEEDS_JOINER.sub(lambda m: m.group() + _JOINER, str(text)).translate(_ESCAPE)


def code(text: object) -> str:
    """``str(text)`` as a Markdown inline code span (shown literally, in monospace), even when it
    contains backticks. Line breaks show as spaces."""
    # Streamlit rewrites ":material/" in the raw source, code spans included.
    value = " ".join(str(text).splitlines()).replace(":material/", ":" + _JOINER + "material/") or " "
    fence = "`" * (max((len(run) for run in _BACKTICKS.findall(value)), default=0) + 1)
    if value.startswith("`") or value.endswith("`") or (value.startswith(" ") and value.endswith(" ") and value.strip()):
        value = f" {value} "  # CommonMark strips one space each side when both are there
    return f"{fence}{value}{fence}"
