#!/bin/bash
# kvctl's bash completion (client/kvctl/kvctl.bash-completion) against the built kvctl:
# commands, the two-word ns commands, global and per-command options, after global options.
#   tests/kvctl/completion.sh COMPLETION_FILE KVCTL
set -u
source "$1"
k=$2
fail=0
expect() { # expect "WANT" WORD... : the completions of the last word
    local want=$1
    shift
    COMP_WORDS=("$k" "$@")
    COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
    COMPREPLY=()
    _kvctl
    local got="${COMPREPLY[*]}"
    if [ "$got" != "$want" ]; then
        echo "completing '$*': got '$got', want '$want'"
        fail=1
    fi
}
expect "ns" n
expect "create list drop" ns ""
expect "verify" --target x ve
expect "--host-codec --host-quota" ns create foo --host
expect "--threads" bench --th
expect "--tls-ca --tls-cert --tls-key --tls-server-name" --tls
expect "stats status" st
[ $fail -eq 0 ] && echo "kvctl completion: ok"
exit $fail
