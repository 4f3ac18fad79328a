#!/bin/bash
# One round of `cp -r /usr/share/doc` into a fresh bftfs mount (f=1) with -o locks=auto and
# with -o locks=off, and into a GlusterFS replica-3 volume (three bricks on 127.0.0.2), one
# after the other, each checked with `diff -r --no-dereference`. Run as root from the
# repository root after `cargo build`; needs glusterfs-server. Work files go to $WORK.
set -u
B=${BFTFS:-$PWD/target/debug/bftfs}
WORK=${WORK:-/var/tmp/bftfs-cp-doc}
SRC=${SRC:-/usr/share/doc}
rm -rf "$WORK"; mkdir -p "$WORK"
for mode in auto off; do
  mkdir -p "$WORK/m-$mode"
  XDG_DATA_HOME="$WORK/x-$mode" "$B" up "$WORK/m-$mode" --detach -o locks=$mode >/dev/null
  s=$(date +%s.%N); cp -r "$SRC" "$WORK/m-$mode/doc"; e=$(date +%s.%N)
  diff -r --no-dereference "$SRC" "$WORK/m-$mode/doc" >/dev/null && ok=same || ok=DIFFERENT
  echo "bftfs locks=$mode: $(echo "$e - $s" | bc) s, copy $ok"
  XDG_DATA_HOME="$WORK/x-$mode" "$B" down "$WORK/m-$mode" >/dev/null
done
mkdir -p "$WORK/gl/b1" "$WORK/gl/b2" "$WORK/gl/b3" "$WORK/gl/mnt"
started_glusterd=
if ! pgrep -x glusterd >/dev/null; then
  glusterd --pid-file="$WORK/gl/glusterd.pid"; started_glusterd=1; sleep 2
fi
gluster --mode=script volume create cpdoc replica 3 127.0.0.2:"$WORK/gl/b1" \
  127.0.0.2:"$WORK/gl/b2" 127.0.0.2:"$WORK/gl/b3" force >/dev/null
gluster --mode=script volume start cpdoc >/dev/null
mount -t glusterfs 127.0.0.2:/cpdoc "$WORK/gl/mnt"
s=$(date +%s.%N); cp -r "$SRC" "$WORK/gl/mnt/doc"; e=$(date +%s.%N)
diff -r --no-dereference "$SRC" "$WORK/gl/mnt/doc" >/dev/null && ok=same || ok=DIFFERENT
echo "glusterfs replica-3: $(echo "$e - $s" | bc) s, copy $ok"
umount "$WORK/gl/mnt"
gluster --mode=script volume stop cpdoc force >/dev/null
gluster --mode=script volume delete cpdoc >/dev/null
[ -n "$started_glusterd" ] && kill "$(cat "$WORK/gl/glusterd.pid")"
rm -rf "$WORK"
