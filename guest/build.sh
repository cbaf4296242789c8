#!/usr/bin/env bash
# Build the Matryoshka default guest (Debian 12 kernel + busybox initramfs).
#
# Output (git-ignored), in guest/out/:
#   vmlinuz             the Debian kernel (bzImage)
#   initramfs.cpio      newc cpio, uncompressed: busybox + virtio/ext4 modules
#                       + /init (the guest would spend 78 M instructions
#                       inflating a gzip one)
#   cmdline             recommended default kernel command line
#   kernel-version      kernel release string (uname -r)
#   debs/               apt-get download cache
#
# Usage: guest/build.sh [--force]
#   Does nothing if vmlinuz and initramfs.cpio exist and are newer than this
#   script, unless --force is given.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$SCRIPT_DIR/out"
DEBS="$OUT/debs"
SELF="$SCRIPT_DIR/build.sh"

# Modules the platform needs later (loaded on demand, never at boot by default).
# crc32c_generic: ext4 needs a crc32c shash at mount time (softdep, not a
# symbol dependency); the generic one works on any CPU (no SSE4.2 needed).
WANT_MODULES=(virtio_pci virtio_mmio virtio_blk virtio_net virtio_console
              virtio-rng ext4 crc32c_generic)

# cryptomgr.notests: no crypto self-tests at boot (as libguestfs boots its
# short-lived appliance): they are 58% of the instructions this guest runs up
# to init. fips=1 runs them regardless.
DEFAULT_CMDLINE="console=ttyS0,115200 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 loglevel=4 nokaslr cryptomgr.notests"

FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force|-f) FORCE=1 ;;
        -h|--help) sed -n '2,13p' "$SELF"; exit 0 ;;
        *) echo "build.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { echo "[guest/build] $*" >&2; }

if [[ $FORCE -eq 0 && -f "$OUT/vmlinuz" && -f "$OUT/initramfs.cpio" \
      && "$OUT/vmlinuz" -nt "$SELF" && "$OUT/initramfs.cpio" -nt "$SELF" ]]; then
    log "up to date (use --force to rebuild)"
    echo "$OUT/vmlinuz"
    echo "$OUT/initramfs.cpio"
    exit 0
fi

# --- host tools --------------------------------------------------------------
SUDO=""
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

APT_UPDATED=0
apt_update() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
}

need_pkgs=()
command -v cpio     >/dev/null 2>&1 || need_pkgs+=(cpio)
command -v gzip     >/dev/null 2>&1 || need_pkgs+=(gzip)
command -v xz       >/dev/null 2>&1 || need_pkgs+=(xz-utils)
command -v zstd     >/dev/null 2>&1 || true   # only needed for .ko.zst (not Debian 12)
command -v depmod   >/dev/null 2>&1 || [[ -x /sbin/depmod ]] || need_pkgs+=(kmod)
command -v dpkg-deb >/dev/null 2>&1 || need_pkgs+=(dpkg)
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
    log "installing missing tools: ${need_pkgs[*]}"
    if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}"; then
        apt_update
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}"
    fi
fi
DEPMOD="$(command -v depmod 2>/dev/null || echo /sbin/depmod)"

# --- resolve and download packages -------------------------------------------
resolve_kernel_pkg() {
    # linux-image-amd64 Depends: linux-image-6.1.0-NN-amd64 (Debian 12 ships the
    # signed image under that name; -unsigned / -dbg variants are separate).
    apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '$1 ~ /^\|?Depends:$/ && $2 ~ /^linux-image-[0-9]/ {print $2}' \
        | grep -v -e '-dbg$' -e '-unsigned$' | head -n1
}

KPKG="$(resolve_kernel_pkg || true)"
if [[ -z "$KPKG" ]]; then
    apt_update
    KPKG="$(resolve_kernel_pkg || true)"
fi
[[ -n "$KPKG" ]] || { log "cannot resolve the kernel package from linux-image-amd64"; exit 1; }
log "kernel package: $KPKG"

mkdir -p "$DEBS"
download() {  # download <pkg>: fetch into $DEBS unless the candidate .deb is cached
    local pkg="$1" ver file
    ver="$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')"
    if [[ -n "$ver" && "$ver" != "(none)" ]]; then
        # .deb file names encode the epoch colon as %3a
        file="$(ls "$DEBS/${pkg}_${ver/:/%3a}_"*.deb 2>/dev/null | head -n1 || true)"
        if [[ -n "$file" ]]; then echo "$file"; return 0; fi
    fi
    # As root, apt would drop privileges to _apt, which cannot write here.
    local aptopt=()
    [[ $(id -u) -eq 0 ]] && aptopt=(-o APT::Sandbox::User=root)
    if ! (cd "$DEBS" && apt-get "${aptopt[@]}" download "$pkg" >&2); then
        apt_update
        (cd "$DEBS" && apt-get "${aptopt[@]}" download "$pkg" >&2)
    fi
    ver="$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')"
    ls "$DEBS/${pkg}_${ver/:/%3a}_"*.deb | head -n1
}
KDEB="$(download "$KPKG")"
BBDEB="$(download busybox-static)"
log "using $(basename "$KDEB"), $(basename "$BBDEB")"

# --- extract ------------------------------------------------------------------
TMP="$(mktemp -d "${TMPDIR:-/tmp}/matryoshka-guest.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
dpkg-deb -x "$KDEB" "$TMP/kernel"
dpkg-deb -x "$BBDEB" "$TMP/busybox"

VMLINUZ="$(ls "$TMP"/kernel/boot/vmlinuz-* | head -n1)"
KVER="${VMLINUZ##*/vmlinuz-}"
KMODSRC=""
for d in "$TMP/kernel/lib/modules/$KVER" "$TMP/kernel/usr/lib/modules/$KVER"; do
    [[ -d "$d" ]] && { KMODSRC="$d"; break; }
done
[[ -n "$KMODSRC" ]] || { log "no modules directory for $KVER in $KDEB"; exit 1; }
log "kernel release: $KVER"

# --- initramfs tree -----------------------------------------------------------
ROOT="$TMP/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,mnt,var/log}
chmod 1777 "$ROOT/tmp"
cp "$TMP/busybox/bin/busybox" "$ROOT/bin/busybox"
chmod 0755 "$ROOT/bin/busybox"

# Applet symlinks (equivalent of `busybox --install -s`, done at build time).
# The static busybox is an x86-64 binary, so it runs on the (x86-64) build host.
{ "$ROOT/bin/busybox" --list-full 2>/dev/null \
    || "$ROOT/bin/busybox" --list | sed 's|^|bin/|'; } | while read -r applet; do
    [[ -z "$applet" || "$applet" == "bin/busybox" ]] && continue
    dir="$(dirname "$applet")"
    mkdir -p "$ROOT/$dir"
    # relative link to /bin/busybox
    rel="$(realpath -m --relative-to="/$dir" /bin/busybox)"
    [[ -e "$ROOT/$applet" || -L "$ROOT/$applet" ]] || ln -s "$rel" "$ROOT/$applet"
done
[[ -e "$ROOT/bin/sh" ]] || ln -s busybox "$ROOT/bin/sh"
# No /sbin/modprobe while the kernel boots: its request_module() calls for
# crypto templates it has built in (hmac(sha256), hmac(sha1), cbc(aes): six
# calls) each ran busybox modprobe, which found nothing, about 0.1 s of the
# boot to init. /init links it first thing, so modules asked for later load.
rm -f "$ROOT/sbin/modprobe"

# Device nodes: the kernel's built-in initramfs already provides /dev/console,
# but create it too when we can (root); /init mounts devtmpfs over /dev anyway.
if [[ $(id -u) -eq 0 ]]; then
    mknod -m 600 "$ROOT/dev/console" c 5 1
    mknod -m 666 "$ROOT/dev/null" c 1 3
fi

# --- kernel modules -----------------------------------------------------------
MODDST="$ROOT/lib/modules/$KVER"
mkdir -p "$MODDST"
norm() { echo "${1//-/_}"; }
# index: normalized module name -> relative path
declare -A MODPATH=()
while IFS= read -r -d '' ko; do
    rel="${ko#"$KMODSRC"/}"
    base="$(basename "$ko")"; base="${base%%.ko*}"
    MODPATH["$(norm "$base")"]="$rel"
done < <(find "$KMODSRC" \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0)
# built-in modules (no .ko needed)
declare -A BUILTIN=()
if [[ -f "$KMODSRC/modules.builtin" ]]; then
    while read -r p; do
        b="$(basename "$p")"; BUILTIN["$(norm "${b%%.ko*}")"]=1
    done < "$KMODSRC/modules.builtin"
fi

modinfo_field() {  # modinfo_field <file> <field>: read .modinfo strings directly
    local f="$1" field="$2" cat=cat
    case "$f" in
        *.xz) cat="xz -dc" ;; *.zst) cat="zstd -dc" ;; *.gz) cat="gzip -dc" ;;
    esac
    $cat "$f" | tr '\0' '\n' | sed -n "s/^$field=//p" | head -n1
}

declare -A INCLUDED=()
add_module() {
    local m; m="$(norm "$1")"
    [[ -n "${INCLUDED[$m]:-}" ]] && return 0
    INCLUDED[$m]=1
    if [[ -z "${MODPATH[$m]:-}" ]]; then
        if [[ -n "${BUILTIN[$m]:-}" ]]; then log "module $m: built in"; return 0; fi
        log "module $m: NOT FOUND in $KPKG"; return 1
    fi
    local rel="${MODPATH[$m]}"
    mkdir -p "$MODDST/$(dirname "$rel")"
    cp "$KMODSRC/$rel" "$MODDST/$rel"
    local deps; deps="$(modinfo_field "$KMODSRC/$rel" depends)"
    local d
    for d in ${deps//,/ }; do add_module "$d"; done
}
for m in "${WANT_MODULES[@]}"; do add_module "$m"; done
log "modules included: ${!INCLUDED[*]}"

for f in modules.order modules.builtin modules.builtin.modinfo; do
    [[ -f "$KMODSRC/$f" ]] && cp "$KMODSRC/$f" "$MODDST/$f"
done
if [[ -x "$DEPMOD" ]]; then
    "$DEPMOD" -b "$ROOT" "$KVER"
else
    log "depmod unavailable; copying the package's modules.* index files"
    cp "$KMODSRC"/modules.* "$MODDST/" 2>/dev/null || true
fi

# --- /etc and /init -------------------------------------------------------------
echo matryoshka > "$ROOT/etc/hostname"
cat > "$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
cat > "$ROOT/etc/group" <<'EOF'
root:x:0:
EOF
cat > "$ROOT/etc/profile" <<'EOF'
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
export HOME=/root
export PS1='~ # '
export TERM="${TERM:-vt100}"
EOF
# udhcpc's event script (Debian's busybox-static looks for it here, ships none): `udhcpc -i eth0`
# configures the address, default route and resolv.conf from the lease.
mkdir -p "$ROOT/etc/udhcpc"
cat > "$ROOT/etc/udhcpc/default.script" <<'EOF'
#!/bin/sh
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for r in $router; do
            ip route replace default via "$r" dev "$interface"
            break
        done
        : > /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done ;;
esac
exit 0
EOF
chmod 0755 "$ROOT/etc/udhcpc/default.script"

cat > "$ROOT/init" <<'EOF'
#!/bin/sh
# Matryoshka default guest init (busybox).
echo "MATRYOSHKA-INIT-START"
ln -s ../bin/busybox /sbin/modprobe 2>/dev/null
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /tmp /dev/pts /dev/shm /run
chmod 1777 /tmp
mount -t devpts devpts /dev/pts 2>/dev/null
hostname -F /etc/hostname 2>/dev/null || hostname matryoshka

CMDLINE="$(cat /proc/cmdline 2>/dev/null)"
has_flag() {
    for w in $CMDLINE; do
        [ "$w" = "$1" ] && return 0
    done
    return 1
}

if has_flag matryoshka.poweroff_after_init; then
    poweroff -f
    # fall through only if poweroff failed
    echo "MATRYOSHKA: poweroff -f failed" >&2
fi

# Optional: matryoshka.modules=virtio_blk,ext4 loads modules at boot.
for w in $CMDLINE; do
    case "$w" in
        matryoshka.modules=*)
            for m in $(echo "${w#matryoshka.modules=}" | tr ',' ' '); do
                modprobe "$m" || echo "MATRYOSHKA: modprobe $m failed"
            done ;;
    esac
done

# Optional: matryoshka.root=/dev/vda mounts that disk and switch_roots to its
# init (matryoshka.init=, default /sbin/init), e.g. the Debian image from
# guest/debian/build-rootfs.sh. matryoshka.rootfstype= (default ext4) and
# matryoshka.rootflags= (default rw) go to mount. On failure: message + shell.
MROOT="" MROOTFS=ext4 MROOTFLAGS=rw MINIT=/sbin/init
for w in $CMDLINE; do
    case "$w" in
        matryoshka.root=*) MROOT="${w#matryoshka.root=}" ;;
        matryoshka.rootfstype=*) MROOTFS="${w#matryoshka.rootfstype=}" ;;
        matryoshka.rootflags=*) MROOTFLAGS="${w#matryoshka.rootflags=}" ;;
        matryoshka.init=*) MINIT="${w#matryoshka.init=}" ;;
    esac
done
if [ -n "$MROOT" ]; then
    # The Debian kernel has these as modules; crc32c_generic: ext4 needs a
    # crc32c shash (a softdep modprobe does not follow here).
    for m in virtio_pci virtio_blk crc32c_generic "$MROOTFS"; do
        modprobe "$m" 2>/dev/null || echo "MATRYOSHKA: modprobe $m failed"
    done
    i=0
    while [ ! -b "$MROOT" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    mkdir -p /newroot
    if [ ! -b "$MROOT" ]; then
        echo "MATRYOSHKA-ROOT-FAILED: no block device $MROOT (is a disk attached?)"
    elif ! mount -t "$MROOTFS" -o "$MROOTFLAGS" "$MROOT" /newroot; then
        echo "MATRYOSHKA-ROOT-FAILED: cannot mount $MROOT ($MROOTFS, $MROOTFLAGS)"
    elif [ ! -e "/newroot$MINIT" ] && [ ! -L "/newroot$MINIT" ]; then
        echo "MATRYOSHKA-ROOT-FAILED: $MROOT has no $MINIT"
        umount /newroot
    else
        echo "MATRYOSHKA-SWITCH-ROOT $MROOT $MINIT"
        # Hand the API filesystems over (systemd accepts them pre-mounted).
        for fs in /dev /proc /sys; do
            mkdir -p "/newroot$fs" && mount --move "$fs" "/newroot$fs"
        done
        exec switch_root /newroot "$MINIT"
    fi
fi

# Optional: matryoshka.cmd="..." runs a command line, prints its exit status
# and powers off (the kernel passes quoted values through intact).
MCMD="$(sed -n 's/.*matryoshka\.cmd="\([^"]*\)".*/\1/p' /proc/cmdline 2>/dev/null)"
if [ -z "$MCMD" ]; then
    MCMD="$(sed -n 's/.*matryoshka\.cmd=\([^ "]*\).*/\1/p' /proc/cmdline 2>/dev/null)"
fi
if [ -n "$MCMD" ]; then
    sh -c "$MCMD"
    echo "MATRYOSHKA-CMD-EXIT $?"
    poweroff -f
fi

export HOME=/root PS1='~ # ' TERM="${TERM:-vt100}"
cd /root
echo "MATRYOSHKA-SHELL"
# setsid + cttyhack gives the shell a controlling tty (the real console
# device, e.g. /dev/ttyS0) so job control and ^C work.
setsid cttyhack sh -l
poweroff -f
EOF
chmod 0755 "$ROOT/init"

# --- pack -------------------------------------------------------------------------
mkdir -p "$OUT"
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort \
    | cpio -o -H newc -R 0:0 --quiet) > "$OUT/initramfs.cpio.tmp"
cp "$VMLINUZ" "$OUT/vmlinuz.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/initramfs.cpio.tmp" "$OUT/initramfs.cpio"
rm -f "$OUT/initramfs.cpio.gz"  # the gzip one of earlier versions
echo "$DEFAULT_CMDLINE" > "$OUT/cmdline"
echo "$KVER" > "$OUT/kernel-version"
echo "$KPKG $(dpkg-deb -f "$KDEB" Version)" > "$OUT/kernel-package"

log "kernel:    $KPKG ($KVER), $(stat -c %s "$OUT/vmlinuz") bytes"
log "initramfs: $(stat -c %s "$OUT/initramfs.cpio") bytes"
echo "$OUT/vmlinuz"
echo "$OUT/initramfs.cpio"
echo "$OUT/cmdline"
echo "$OUT/kernel-version"
