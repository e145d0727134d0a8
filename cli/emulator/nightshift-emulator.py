#!/usr/bin/env python3
"""moto_server, with DynamoDB transactions that snapshot a table once.

moto keeps a deep copy of a table to roll a failed TransactWriteItems back,
but takes it again for every item of the transaction: a transaction of 100
items on a table of N items copies 100 x N items, which makes the local
stack slow down and grow (gigabytes) as the table fills. Here the copy is
taken once per table per transaction. Nothing else changes: the items are
not written until every copy is taken, so each copy is the same.

Installed by the Makefile next to moto_server in the virtualenv, with its
interpreter; the local stack runs it with moto_server's arguments.
"""

import copy
import functools
import sys
import threading

import moto
import moto.dynamodb.models as dynamodb
from moto.server import main

# Written against this version's transact_write_items: before moving the
# pin, check that it still copies the table per item (or drop this file).
MOTO_VERSION = "5.2.5"
if moto.__version__ != MOTO_VERSION:
    sys.exit(f"nightshift-emulator is written for moto {MOTO_VERSION}, not {moto.__version__}")


class _CopyOncePerTransaction:
    """The `copy` module as moto's DynamoDB models see it: within one
    transaction, a second deep copy of the same object is the first one."""

    def __init__(self):
        self._local = threading.local()

    def __getattr__(self, name):
        return getattr(copy, name)

    def deepcopy(self, value, memo=None):
        taken = getattr(self._local, "taken", None)
        if taken is None:
            return copy.deepcopy(value, memo)
        if id(value) not in taken:
            taken[id(value)] = (value, copy.deepcopy(value, memo))
        return taken[id(value)][1]

    def transaction(self, function):
        @functools.wraps(function)
        def once(*args, **kwargs):
            self._local.taken = {}
            try:
                return function(*args, **kwargs)
            finally:
                self._local.taken = None

        return once


_copies = _CopyOncePerTransaction()
dynamodb.copy = _copies
dynamodb.DynamoDBBackend.transact_write_items = _copies.transaction(
    dynamodb.DynamoDBBackend.transact_write_items
)

if __name__ == "__main__":
    sys.exit(main())
