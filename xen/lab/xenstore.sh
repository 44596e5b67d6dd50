#!/bin/sh
# A stand-in for xenstore-utils (xenstore-read/-write/-exists/-rm/-list) over a directory
# tree, for the lab: no xenstored can run without a Xen hypervisor.
#
# Node /a/b is the directory $CONVERGENT_XEN_ROOT/xenstore/a/b; its value is the file .v in
# it (".": never a xenstore path character, so it cannot collide with a child). A path not
# starting with / is relative to dom0's home, /local/domain/0, as with the real tools.
# Semantics kept from tools/xs-clients/xenstore_client.c and xenstored: read prints one line
# per path and stops at the first missing one (exit 1, what was read is still printed; -p
# prefixes "path: "); write creates missing parents with empty values; exists fails if any
# path is missing; rm of a missing node succeeds when its parent exists (-t also removes
# emptied, valueless parents); list prints the children. Values are single lines; writes
# are atomic (temporary file, then rename). Invoked as xenstore-MODE or "xenstore MODE".
set -u
root=${CONVERGENT_XEN_ROOT:?xenstore stand-in: CONVERGENT_XEN_ROOT is not set}/xenstore
prog=${0##*/}
mode=${prog#xenstore-}
if [ "$mode" = "$prog" ]; then
    mode=${1:?usage: xenstore read|write|exists|rm|list PATH...}
    shift
fi

prefix=0 tidy=0 nr=-1
while [ $# -gt 0 ]; do
    case $1 in
        -p) prefix=1 ;;
        -t) tidy=1 ;;
        -n) nr=$2; shift ;;
        -s|-R|-r) ;;  # socket / raw / no transaction: meaningless for a directory tree
        --) shift; break ;;
        -*) echo "xenstore-$mode: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
    shift
done

# node PATH: sets $d to the node's directory; refuses what xenstored refuses
node() {
    case $1 in
        ''|*[!A-Za-z0-9/_@-]*|*//*) echo "xenstore-$mode: invalid path $1" >&2; exit 1 ;;
        /) d=$root abs=/ ;;
        /*) abs=${1%/} ;;
        *) abs=/local/domain/0/${1%/} ;;
    esac
    d=$root$abs
}

changed() { printf '%s\n' "$abs" >> "$root/.changes"; }

value() {  # value of node $d into $v ("" when it has none)
    v=
    [ -f "$d/.v" ] && IFS= read -r v < "$d/.v"
}

tidy_up() {  # remove $1 and its parents while they have neither value nor children
    d=$1
    while [ "$d" != "$root" ]; do
        value
        [ -z "$v" ] || return 0
        for c in "$d"/*/; do [ -d "$c" ] && return 0; done
        rm -rf "$d"
        d=${d%/*}
    done
}

status=0
case $mode in
    read)
        for p in "$@"; do
            node "$p"
            if [ ! -d "$d" ]; then
                echo "xenstore-read: couldn't read path $p" >&2
                exit 1
            fi
            value
            if [ $prefix = 1 ]; then printf '%s: %s\n' "$p" "$v"; else printf '%s\n' "$v"; fi
        done
        ;;
    write)
        [ $(($# % 2)) = 0 ] && [ $# -gt 0 ] || { echo "usage: xenstore-write PATH VALUE..." >&2; exit 2; }
        while [ $# -gt 0 ]; do
            node "$1"
            [ -d "$d" ] || mkdir -p "$d" || exit 1
            printf '%s\n' "$2" > "$d/.v.$$" && mv -f "$d/.v.$$" "$d/.v" || {
                echo "xenstore-write: could not write path $1" >&2; exit 1; }
            changed
            shift 2
        done
        ;;
    exists)
        for p in "$@"; do
            node "$p"
            [ -d "$d" ] || exit 1
        done
        ;;
    rm)
        for p in "$@"; do
            node "$p"
            if [ -d "$d" ]; then
                rm -rf "$d"
                changed
            elif [ ! -d "${d%/*}" ]; then
                echo "xenstore-rm: could not remove path $p" >&2
                exit 1
            fi
            [ $tidy = 1 ] && tidy_up "${d%/*}"
        done
        ;;
    list)
        for p in "$@"; do
            node "$p"
            if [ ! -d "$d" ]; then
                echo "xenstore-list: could not list path $p" >&2
                exit 1
            fi
            for c in "$d"/*/; do
                [ -d "$c" ] || continue
                c=${c%/}
                if [ $prefix = 1 ]; then printf '%s/%s\n' "${p%/}" "${c##*/}"; else printf '%s\n' "${c##*/}"; fi
            done
        done
        ;;
    watch)
        node "${1:?usage: xenstore-watch [-n NR] PATH}"
        [ -d "$root" ] || mkdir -p "$root"
        : >> "$root/.changes"
        pat=$abs
        [ "$abs" = / ] && pat=
        # from the size at registration: a change made before tail runs is not lost
        size=$(wc -c < "$root/.changes")
        printf '%s\n' "$1"
        [ "$nr" = 1 ] && exit 0
        tail -c "+$((size + 1))" -F "$root/.changes" 2>/dev/null | {
            seen=1
            while IFS= read -r c; do
                case $c in
                    "$pat"|"$pat"/*)
                        printf '%s\n' "$c" || exit 0
                        seen=$((seen + 1))
                        [ "$seen" = "$nr" ] && exit 0 ;;
                esac
            done
        }
        ;;
    *)
        echo "xenstore: unknown mode $mode" >&2
        exit 2
        ;;
esac
exit $status
