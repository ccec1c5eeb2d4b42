#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-only
# Fail if an x86-64 object makes any indirect call or jump: a "call *", "jmp *" or
# a call to a retpoline / call-depth thunk (__x86_indirect_*). crng.c finds the
# kernel CRNG's objects by name and must never call through an address it looked
# up (under IBT such a call traps); with no indirect call at all, it cannot.
# Used by check-builds.sh on every kernel's crng.o.
#   no-indirect-calls.sh OBJ...
set -eu
rc=0
for obj in "$@"; do
	found=$(objdump -d -r --no-show-raw-insn "$obj" |
		grep -E '(call|jmp)q? +\*|__x86_indirect_(thunk|call_thunk|jump_thunk)' || true)
	if [ -n "$found" ]; then
		echo "no-indirect-calls: $obj makes indirect calls:" >&2
		echo "$found" >&2
		rc=1
	fi
done
exit $rc
