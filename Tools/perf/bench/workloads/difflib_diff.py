# difflib compares a large file with an edited copy of itself, and looks
# for close matches among its words.
import difflib
import re

from debian import stdlib_source

TEXT = stdlib_source("typing")
OLD = TEXT.splitlines(keepends=True)
NEW = [line.replace("self", "this") if i % 7 == 0 else line
       for i, line in enumerate(OLD) if i % 13 != 0]
WORDS = sorted(set(re.findall(r"[A-Za-z_]\w+", TEXT)))


def run():
    list(difflib.unified_diff(OLD, NEW))
    list(difflib.ndiff(OLD, NEW))
    for word in WORDS[::100]:
        difflib.get_close_matches(word + "x", WORDS)
