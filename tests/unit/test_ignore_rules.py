"""When a change of the ignore rules may let through what they ignored before (then a replica
asks its peers for every record again: see Replica.ignore)."""

import pytest
from repld.daemon.ignore import Ignore


@pytest.mark.parametrize(
    ("before", "after", "more"),
    [
        (["cache/"], ["cache/"], False),
        (["cache/"], ["cache/", "*.tmp"], False),  # a rule added only ignores more
        (["cache/"], ["*.tmp", "cache/"], False),
        (["cache/", "*.tmp"], ["*.tmp"], True),  # a rule removed
        (["cache/"], [], True),
        (["*.log"], ["*.log", "!keep.log"], True),  # a negation added
        (["*.log", "!keep.log"], ["!keep.log", "*.log"], True),  # reordered around a negation
        ([], ["# only a comment", ""], False),
    ],
)
def test_only_rules_that_may_let_more_through_count(tmp_path, before, after, more):
    assert Ignore(tmp_path, after).may_show_more_than(Ignore(tmp_path, before).rules) is more
