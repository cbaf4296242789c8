#!/usr/bin/env bash
# Build a Debian 12 (bookworm) root filesystem image for Matryoshka.
#
# Output (git-ignored), in guest/out/:
#   debian.img          raw ext4 image (2 GiB sparse) for /dev/vda: systemd,
#                       root autologin on ttyS0, DHCP via systemd-networkd,
#                       busybox (wget, httpd, nc), and the modules of
#                       the guest kernel (guest/out/kernel-version)
#   debootstrap-cache/  downloaded .debs (reused by later builds)
#
# Usage: guest/debian/build-rootfs.sh [--force] [--size 2G]
#   Does nothing if debian.img is newer than this script and holds the modules
#   of the current guest kernel (guest/out/kernel-package), unless --force.
#   Needs root (debootstrap, chroot); installs debootstrap and e2fsprogs with
#   apt-get if missing.
#   Mirror: DEBIAN_MIRROR (default http://deb.debian.org/debian, the one the
#   host's apt sources and guest/build.sh use).
#
# Boot it (kernel + initramfs from guest/build.sh, see guest/README.md):
#   matryoshka run --disk guest/out/debian.img \
#     --cmdline "$(cat guest/out/cmdline) matryoshka.root=/dev/vda"
# Root password: "matryoshka" (the serial console logs in automatically).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GUEST_DIR="$(dirname "$SCRIPT_DIR")"
OUT="$GUEST_DIR/out"
SELF="$SCRIPT_DIR/build-rootfs.sh"
IMG="$OUT/debian.img"
CACHE="$OUT/debootstrap-cache"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SIZE=2G
HOSTNAME_GUEST=matryoshka-debian
ROOT_PASSWORD=matryoshka

# systemd + udev (module autoloading), dbus (logind, networkctl), iproute2,
# busybox (wget/httpd/nc for tests; the static build segfaults in wget: NSS), netbase (/etc/services etc.).
INCLUDE=systemd,systemd-sysv,udev,dbus,kmod,iproute2,netbase,busybox

FORCE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --force|-f) FORCE=1 ;;
        --size) SIZE="${2:?--size needs a value, e.g. 2G}"; shift ;;
        -h|--help) sed -n '2,22p' "$SELF"; exit 0 ;;
        *) echo "build-rootfs.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "[guest/debian] $*" >&2; }
die() { echo "[guest/debian] error: $*" >&2; exit 1; }
T0=$SECONDS

# The image records which kernel's modules it holds (debian.img.kernel); a new
# kernel package in guest/out/kernel-package means a rebuild.
if [[ $FORCE -eq 0 && -f "$IMG" && "$IMG" -nt "$SELF" && -f "$IMG.kernel" \
      && "$(cat "$IMG.kernel")" == "$(cat "$OUT/kernel-package" 2>/dev/null)" ]]; then
    log "up to date (use --force to rebuild)"
    echo "$IMG"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap and chroot need it); try: sudo $0"

# --- host tools ----------------------------------------------------------------
need_pkgs=()
command -v debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
command -v mkfs.ext4   >/dev/null 2>&1 || [[ -x /sbin/mkfs.ext4 ]] || need_pkgs+=(e2fsprogs)
command -v dpkg-deb    >/dev/null 2>&1 || need_pkgs+=(dpkg)
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
    log "installing missing tools: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${need_pkgs[@]}" >&2 \
        || { apt-get update -qq >&2 && apt-get install -y -qq "${need_pkgs[@]}" >&2; } \
        || die "could not install ${need_pkgs[*]} with apt-get"
fi
MKFS="$(command -v mkfs.ext4 || echo /sbin/mkfs.ext4)"
mke2fs_ver="$("$MKFS" -V 2>&1 | awk 'NR==1 {print $2}')"
# -d (populate from a directory) appeared in e2fsprogs 1.43.
[[ "$(printf '%s\n1.43\n' "$mke2fs_ver" | sort -V | head -n1)" == 1.43 ]] \
    || die "mkfs.ext4 $mke2fs_ver is too old (need e2fsprogs >= 1.43 for -d)"

# --- the guest kernel (its modules go into the image) ------------------------------
if [[ ! -f "$OUT/kernel-version" || ! -f "$OUT/kernel-package" ]]; then
    log "guest/out has no kernel yet; running guest/build.sh"
    bash "$GUEST_DIR/build.sh" >/dev/null || die "guest/build.sh failed"
fi
KVER="$(cat "$OUT/kernel-version")"
read -r KPKG KPKGVER < "$OUT/kernel-package"
KDEB="$(ls "$OUT/debs/${KPKG}_${KPKGVER/:/%3a}_"*.deb 2>/dev/null | head -n1 || true)"
if [[ -z "$KDEB" ]]; then
    log "kernel package $KPKG $KPKGVER not in guest/out/debs; running guest/build.sh --force"
    bash "$GUEST_DIR/build.sh" --force >/dev/null || die "guest/build.sh failed"
    KVER="$(cat "$OUT/kernel-version")"
    read -r KPKG KPKGVER < "$OUT/kernel-package"
    KDEB="$(ls "$OUT/debs/${KPKG}_${KPKGVER/:/%3a}_"*.deb 2>/dev/null | head -n1 || true)"
    [[ -n "$KDEB" ]] || die "no .deb for $KPKG $KPKGVER in $OUT/debs"
fi
log "kernel modules from $(basename "$KDEB") ($KVER)"

# --- work directory (same filesystem as out/, cleaned up on any exit) --------------
mkdir -p "$OUT" "$CACHE"
WORK="$(mktemp -d "$OUT/.rootfs-build.XXXXXX")"
ROOT="$WORK/root"
cleanup() {
    # Unmount anything debootstrap or we left mounted below $WORK (deepest first)
    # before deleting, so rm can never reach the host's /proc, /sys or /dev.
    local m
    for m in $(awk -v w="$WORK" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

# --- debootstrap ---------------------------------------------------------------------
log "debootstrap $SUITE (minbase + $INCLUDE) from $MIRROR"
t=$SECONDS
if ! debootstrap --variant=minbase --include="$INCLUDE" --cache-dir="$CACHE" \
        "$SUITE" "$ROOT" "$MIRROR" > "$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2
    [[ -f "$ROOT/debootstrap/debootstrap.log" ]] && tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (log above); is $MIRROR reachable?"
fi
log "debootstrap done in $((SECONDS - t)) s"

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

# --- kernel modules ------------------------------------------------------------------
# Extract the kernel package and copy /lib/modules/$KVER (not the package itself:
# its postinst would want initramfs-tools and a bootloader). Drop driver trees a
# serial-console VM never uses to keep the image small.
dpkg-deb -x "$KDEB" "$WORK/kernel"
KMOD=""
for d in "$WORK/kernel/lib/modules/$KVER" "$WORK/kernel/usr/lib/modules/$KVER"; do
    [[ -d "$d" ]] && { KMOD="$d"; break; }
done
[[ -n "$KMOD" ]] || die "no modules for $KVER in $KDEB"
for sub in drivers/gpu drivers/media drivers/infiniband drivers/staging drivers/isdn \
           drivers/bluetooth drivers/net/wireless drivers/iio sound net/bluetooth \
           net/wireless net/mac80211; do
    rm -rf "${KMOD:?}/kernel/$sub"
done
mkdir -p "$ROOT/usr/lib/modules"     # bookworm is merged-/usr: /lib -> usr/lib
cp -a "$KMOD" "$ROOT/usr/lib/modules/$KVER"
in_root depmod -a "$KVER"
log "modules: $(du -sh "$ROOT/usr/lib/modules/$KVER" | cut -f1)"

# --- configuration ---------------------------------------------------------------------
echo "$HOSTNAME_GUEST" > "$ROOT/etc/hostname"
cat > "$ROOT/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$HOSTNAME_GUEST
::1		localhost ip6-localhost ip6-loopback
EOF
# The initramfs mounts /dev/vda read-write, so no fsck pass (systemd would skip it
# on a read-write root anyway).
cat > "$ROOT/etc/fstab" <<'EOF'
# <device>  <mount point>  <type>  <options>                <dump> <pass>
/dev/vda    /              ext4    rw,errors=remount-ro     0      0
EOF
echo "root:$ROOT_PASSWORD" | in_root chpasswd

# Root autologin on the serial console (ttyS0, console=ttyS0 on the kernel command line).
mkdir -p "$ROOT/etc/systemd/system/serial-getty@ttyS0.service.d"
cat > "$ROOT/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM
EOF
in_root systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1
# No VGA console in the VM.
rm -f "$ROOT/etc/systemd/system/getty.target.wants/getty@tty1.service"

# DHCP on any wired NIC (virtio-net shows up as ens*/enp*s*/eth*).
mkdir -p "$ROOT/etc/systemd/network"
cat > "$ROOT/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
EOF
in_root systemctl enable systemd-networkd.service >/dev/null 2>&1
# QEMU-style user networking answers DNS at 10.0.2.3.
rm -f "$ROOT/etc/resolv.conf"
echo "nameserver 10.0.2.3" > "$ROOT/etc/resolv.conf"

# Boot fast: mask units that are slow, periodic or irrelevant in a test VM, and
# everything that waits for the network to be "online".
MASK=(apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service
      e2scrub_all.timer e2scrub_all.service e2scrub_reap.service
      fstrim.timer dpkg-db-backup.timer man-db.timer logrotate.timer
      systemd-networkd-wait-online.service systemd-time-wait-sync.service
      systemd-timesyncd.service
      getty@tty1.service
      # Pseudo-filesystems and module preloads nothing here uses; each costs a
      # fork+exec, which is slow on an emulated CPU.
      modprobe@drm.service modprobe@efi_pstore.service modprobe@dm_mod.service
      modprobe@fuse.service modprobe@loop.service modprobe@configfs.service
      sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount
      sys-fs-fuse-connections.mount dev-hugepages.mount systemd-pstore.service)
for u in "${MASK[@]}"; do ln -sfn /dev/null "$ROOT/etc/systemd/system/$u"; done
# Hardware a VM on a software CPU has no use for; udev would load these from
# the emulated PC's modaliases (legacy ISA probes are slow to time out).
cat > "$ROOT/etc/modprobe.d/matryoshka-blacklist.conf" <<'EOF'
blacklist floppy
blacklist parport_pc
blacklist ppdev
blacklist pcspkr
blacklist kvm
blacklist kvm_amd
blacklist kvm_intel
EOF
# Journal in memory only (less disk I/O through the emulated disk).
mkdir -p "$ROOT/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' > "$ROOT/etc/systemd/journald.conf.d/volatile.conf"

# No docs, man pages or translations now or from later apt installs.
cat > "$ROOT/etc/dpkg/dpkg.cfg.d/01-matryoshka-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
find "$ROOT/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/usr/share/lintian/*
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
in_root apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/log/*.log \
       "$ROOT"/var/cache/debconf/*-old "$ROOT"/var/lib/dpkg/*-old "$ROOT/debootstrap"
# A fresh machine-id per image build (dbus and journald need one).
in_root systemd-machine-id-setup >/dev/null 2>&1 || true

# --- image ----------------------------------------------------------------------------
log "root tree: $(du -sh --one-file-system "$ROOT" | cut -f1); making $SIZE ext4 image"
rm -f "$IMG.tmp"
truncate -s "$SIZE" "$IMG.tmp"
"$MKFS" -F -q -t ext4 -L debian-root -d "$ROOT" "$IMG.tmp" \
    || die "mkfs.ext4 -d failed (is the image size $SIZE big enough?)"
mv "$IMG.tmp" "$IMG"
cp "$OUT/kernel-package" "$IMG.kernel"
log "built $IMG ($(du -h "$IMG" | cut -f1) used of $SIZE) in $((SECONDS - T0)) s"
echo "$IMG"
