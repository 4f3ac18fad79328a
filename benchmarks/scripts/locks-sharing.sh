#!/bin/bash
# Two things automatic Zzyzx locks (the default) meet in shared use, on one f=1 cluster
# started with `bftfs up` and mounted a second time with `bftfs mount`:
#  1. revocation: mount A writes 40 files into a fresh directory (it locks it), then mount B
#     reads one of them; the time of B's `cat` is what a second client waits for a tree
#     another holds (ROUNDS rounds, one directory each);
#  2. a directory bigger than a lock's pool: mount A creates FILES empty files in one
#     directory (one `:>` each, sequentially), the time of the whole loop.
# Run as root from the repository root after `cargo build --release`. Work files go to $WORK.
set -u
B=${BFTFS:-$PWD/target/release/bftfs}
WORK=${WORK:-/var/tmp/bftfs-locks-sharing}
ROUNDS=${ROUNDS:-3}
FILES=${FILES:-20000}
rm -rf "$WORK"; mkdir -p "$WORK/a" "$WORK/b"
export XDG_DATA_HOME="$WORK/xdg"
"$B" up "$WORK/a" --detach >/dev/null
data=$("$B" status "$WORK/a" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["data_dir"])')
"$B" mount "$data/cluster/cluster.json" "$WORK/b" --detach >/dev/null
for r in $(seq 1 "$ROUNDS"); do
  mkdir "$WORK/a/d$r"
  for j in $(seq 1 40); do echo "d$j" > "$WORK/a/d$r/f$j"; done
  sleep 1
  s=$(date +%s.%N); got=$(cat "$WORK/b/d$r/f3"); e=$(date +%s.%N)
  [ "$got" = d3 ] && ok=right || ok=WRONG
  echo "revocation round $r: the other mount's first read took $(echo "$e - $s" | bc) s ($ok content)"
done
mkdir "$WORK/a/big"
s=$(date +%s.%N)
for i in $(seq 1 "$FILES"); do : > "$WORK/a/big/f$i"; done
e=$(date +%s.%N)
n=$(ls "$WORK/b/big" | wc -l)
echo "$FILES creates in one directory: $(echo "$e - $s" | bc) s; the other mount lists $n"
"$B" umount "$WORK/b" >/dev/null
"$B" down "$WORK/a" >/dev/null
rm -rf "$WORK"
