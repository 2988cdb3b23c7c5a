#!/usr/bin/env bash
# Builds the memd test guest: the Debian kernel plus an initramfs holding busybox, python3-minimal,
# the virtio modules and the memd guest agent. No debootstrap and no kernel install on the host: the
# few packages needed are fetched with `apt-get download` and unpacked with `dpkg-deb -x`.
#
#   vm-images/build.sh --print-versions   print "package=version" for every input package, resolved
#                                         from the apt lists (hypervisor/vmimage.py hashes this)
#   vm-images/build.sh OUTDIR             write OUTDIR/vmlinux, OUTDIR/initrd.img, OUTDIR/manifest.txt
#
# Environment: MEMD_SRC (repo root, default: this script's parent); MEMD_DEB_CACHE (where downloaded
# .debs are kept between builds, default OUTDIR/../debs); MEMD_INITRD_COMPRESS (none|gzip|zstd,
# default none: TCG boots ~1 s faster from a plain cpio than from zstd, and the guest frees the
# ~25 MB once unpacked).
# Normally run through hypervisor.vmimage.ensure_image(), which caches the result by a hash of inputs.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=${MEMD_SRC:-$(dirname "$here")}

# python3.11-minimal needs libc6, zlib1g, libexpat1 (checked with ldd); libssl3 only serves _ssl and
# _hashlib, which python3-minimal's hashlib falls back from, so it is left out.
PACKAGES=(busybox-static python3-minimal python3.11-minimal libpython3.11-minimal libc6 zlib1g libexpat1)
# Load order matters without udev/modprobe: each module after the ones it depends on. button and
# evdev (no dependencies) make the ACPI power button an input device busybox acpid reads: that is
# how `virsh shutdown` (an ACPI power-button press) reaches the guest.
# virtio_blk: the memd swap disk (NBD served by memd, a virtio disk to the guest: /dev/vda).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console
         virtio_blk button evdev)

# Prints "package=version" for the guest kernel (the one linux-image-amd64 pins with "(= version)")
# and every package above, at their candidate versions: exactly what gets unpacked. One apt-cache
# call, because each call re-reads the package lists when apt's binary cache is disabled (~1 s).
resolve_versions() {
    apt-cache show --no-all-versions linux-image-amd64 "${PACKAGES[@]}" 2>/dev/null | awk -v want="${#PACKAGES[@]}" '
        /^Package:/ { pkg = $2 }
        /^Version:/ && pkg != "linux-image-amd64" { print pkg "=" $2; n++ }
        /^Depends:/ && pkg == "linux-image-amd64" {
            if (match($0, /linux-image-[0-9][^ ,]* \(= [^)]*\)/)) {
                split(substr($0, RSTART, RLENGTH), f, /[ ()=]+/); kernel = f[1] "=" f[2]
            }
        }
        END {
            if (kernel == "" || n != want) {
                print "build.sh: cannot resolve the guest packages (run apt-get update?)" > "/dev/stderr"
                exit 1
            }
            print kernel
        }'
}

if [[ "${1:-}" == "--print-versions" ]]; then
    resolve_versions
    exit 0
fi
[[ $# -eq 1 ]] || { echo "usage: $0 --print-versions | OUTDIR" >&2; exit 2; }

out=$(mkdir -p "$1" && cd "$1" && pwd)
debs=${MEMD_DEB_CACHE:-$(dirname "$out")/debs}
compress=${MEMD_INITRD_COMPRESS:-none}
mkdir -p "$debs"
work=$(mktemp -d "${TMPDIR:-/tmp}/memd-vmimage.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"

# --- fetch and unpack the packages -------------------------------------------------------------
mapfile -t pins < <(resolve_versions)
want=()
for pin in "${pins[@]}"; do
    pkg=${pin%%=*} ver=${pin#*=}
    deb="$debs/${pkg}_${ver//:/%3a}_amd64.deb"
    [[ -s "$deb" ]] || want+=("$pin")
done
if ((${#want[@]})); then
    # apt-get download writes into the current directory; _apt cannot write root-owned dirs, which
    # only costs a warning.
    (cd "$debs" && apt-get download -q "${want[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) || true
fi
kdir=$work/kernel
for pin in "${pins[@]}"; do
    pkg=${pin%%=*} ver=${pin#*=}
    deb="$debs/${pkg}_${ver//:/%3a}_amd64.deb"
    [[ -s "$deb" ]] || { echo "build.sh: download of $pin failed" >&2; exit 1; }
    if [[ "$pkg" == linux-image-* ]]; then dpkg-deb -x "$deb" "$kdir"; else dpkg-deb -x "$deb" "$root"; fi
done

# --- kernel and modules ------------------------------------------------------------------------
kver=$(basename "$(ls -d "$kdir"/lib/modules/*)")
# QEMU boots an uncompressed ELF vmlinux through its PVH entry point, skipping SeaBIOS's real-mode
# loader and the kernel's self-decompression: ~4 s less per boot under TCG. The bzImage carries
# the ELF as one compressed stream (xz for Debian); find it by magic, as the kernel's
# extract-vmlinux does. Without CONFIG_PVH, or if nothing decompresses to an ELF, the bzImage
# itself is used.
extract_vmlinux() {
    python3 - "$1" "$out/vmlinux.tmp" <<'PY'
import lzma, sys, zlib
data = open(sys.argv[1], "rb").read()
def unxz(b: bytes) -> bytes: return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(b)
def ungz(b: bytes) -> bytes: return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b)
for magic, decompress in ((b"\xfd7zXZ\x00", unxz), (b"\x1f\x8b\x08", ungz)):
    at = data.find(magic)
    while at >= 0:
        try:
            elf = decompress(data[at:])
        except (lzma.LZMAError, zlib.error):
            elf = b""
        if elf.startswith(b"\x7fELF"):
            open(sys.argv[2], "wb").write(elf)
            sys.exit(0)
        at = data.find(magic, at + 1)
sys.exit(1)
PY
}
if grep -q '^CONFIG_PVH=y' "$kdir/boot/config-$kver" && extract_vmlinux "$kdir/boot/vmlinuz-$kver"; then
    kernel_kind=vmlinux-pvh
else
    cp "$kdir/boot/vmlinuz-$kver" "$out/vmlinux.tmp"
    kernel_kind=bzimage
fi
mkdir -p "$root/lib/modules/$kver"
: > "$root/lib/modules/load-order"
for m in "${MODULES[@]}"; do
    if grep -q "/$m.ko" "$kdir/lib/modules/$kver/modules.builtin"; then
        continue                                   # built into this kernel: nothing to load
    fi
    ko=$(find "$kdir/lib/modules/$kver/kernel" -name "$m.ko*" | head -n1)
    [[ -n "$ko" ]] || { echo "build.sh: module $m not found in $kver" >&2; exit 1; }
    # busybox insmod cannot read compressed modules: store them plain.
    case "$ko" in
        *.ko.xz)  xz -dc "$ko" > "$root/lib/modules/$kver/$m.ko" ;;
        *.ko.zst) zstd -qdc "$ko" > "$root/lib/modules/$kver/$m.ko" ;;
        *.ko.gz)  gzip -dc "$ko" > "$root/lib/modules/$kver/$m.ko" ;;
        *)        cp "$ko" "$root/lib/modules/$kver/$m.ko" ;;
    esac
    echo "/lib/modules/$kver/$m.ko" >> "$root/lib/modules/load-order"
done

# --- prune what a python3-minimal + busybox guest never touches --------------------------------
rm -rf "$root"/usr/share "$root"/usr/lib/x86_64-linux-gnu/gconv "$root"/usr/lib/x86_64-linux-gnu/audit \
       "$root"/usr/libexec "$root"/etc/ld.so.conf.d "$root"/var "$root"/sbin/ldconfig* "$root"/usr/sbin \
       "$root"/sbin
find "$root/usr/bin" -mindepth 1 ! -name 'python3*' -delete
rm -rf "$root"/usr/lib/python3.11/lib-dynload/_ssl.* "$root"/usr/lib/python3.11/lib-dynload/_hashlib.*
# Libraries nothing here links (python3.11 needs libm, libz, libexpat, libc; busybox is static):
# 1.2 MB less in the rootfs, whose tmpfs limit is half of what a 128 MiB guest has left after the
# kernel and the initrd (~25 MB): the unpacked image must stay below it.
rm -f "$root"/lib/x86_64-linux-gnu/libmvec.so* "$root"/usr/lib/x86_64-linux-gnu/libexpatw.so*

# --- busybox userland and the memd guest agent -------------------------------------------------
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,etc,mnt}
chmod 1777 "$root/tmp"
[[ -x "$root/bin/busybox" ]] || { echo "build.sh: busybox-static did not provide /bin/busybox" >&2; exit 1; }
for applet in $("$root/bin/busybox" --list-full); do
    [[ -e "$root/$applet" || -L "$root/$applet" ]] || ln -s /bin/busybox "$root/$applet"
done
install -m 0755 "$here/init" "$root/init"
install -m 0755 "$here/memd-port-links" "$root/sbin/memd-port-links"
install -m 0644 "$here/inittab" "$root/etc/inittab"
install -m 0644 "$here/profile" "$root/etc/profile"
printf '%s\n' 'vport[0-9]+p[0-9]+ 0:0 600 ! */sbin/memd-port-links' '.* 0:0 600 !' > "$root/etc/mdev.conf"
# busybox acpid (started by inittab) maps the power button's KEY_POWER to the action PWRF, which
# this file names explicitly, and runs /etc/acpi/PWRF/00000080: a clean busybox poweroff (init
# kills everything, syncs, powers off through ACPI; libvirt then reports the domain shut off).
printf '%s\n' '# busybox acpid: action key, then the handler path under /etc/acpi' \
    'PWRF PWRF/00000080' > "$root/etc/acpid.conf"
mkdir -p "$root/etc/acpi/PWRF"
printf '%s\n' '#!/bin/sh' \
    '# ACPI power button (virsh shutdown, QMP system_powerdown): clean poweroff.' \
    'exec /sbin/poweroff' > "$root/etc/acpi/PWRF/00000080"
chmod 0755 "$root/etc/acpi/PWRF/00000080"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
printf 'memd-guest\n' > "$root/etc/hostname"

# The agent (stdlib-only by rule): the files vm-images/agent-files.txt lists, the one list that
# hypervisor/vmimage.py also hashes. A pattern that matches nothing is an error.
agent=$root/usr/lib/memd
mkdir -p "$agent/memd"
while read -r pattern; do
    [[ -z "$pattern" || "$pattern" == \#* ]] && continue
    found=0
    for f in "$src"/$pattern; do
        [[ -f "$f" ]] || continue
        install -D -m 0644 "$f" "$agent/${f#"$src"/}"
        found=1
    done
    ((found)) || { echo "build.sh: agent-files.txt: nothing matches $pattern" >&2; exit 1; }
done < "$here/agent-files.txt"
if [[ -f "$agent/memd/guest/__main__.py" ]]; then
    entry='exec python3 -m memd.guest "$@"'
else   # no __main__ yet: call the console-script target named in pyproject.toml
    entry='exec python3 -c "import sys; from memd.guest.cli import main; sys.argv[0] = \"memd-guest\"; sys.exit(main())" "$@"'
fi
printf '#!/bin/sh\n# memd guest agent (stdlib only); PYTHONPATH is set by /init via /etc/profile\n%s\n' \
    "$entry" > "$root/usr/bin/memd-guest"
chmod 0755 "$root/usr/bin/memd-guest"

# Byte-compile with the guest's own interpreter (run through the unpacked loader): a TCG guest
# compiling the stdlib on every boot would spend seconds on it. unchecked-hash: no mtime checks.
PYTHONHOME=$root/usr PYTHONDONTWRITEBYTECODE=1 \
    "$root/lib64/ld-linux-x86-64.so.2" --library-path "$root/lib/x86_64-linux-gnu" \
    "$root/usr/bin/python3.11" -s -c '
import compileall, sys
root = sys.argv[1]
ok = True
for d in ("/usr/lib/python3.11", "/usr/lib/memd"):
    ok &= compileall.compile_dir(root + d, quiet=1, stripdir=root, prependdir="/", workers=1,
                                 invalidation_mode=compileall.py_compile.PycInvalidationMode.UNCHECKED_HASH)
sys.exit(0 if ok else 1)' "$root" </dev/null >/dev/null 2>"$work/compile.err" ||
    { echo "build.sh: byte-compiling failed (syntax error in memd/guest?):" >&2; cat "$work/compile.err" >&2; exit 1; }

# --- pack --------------------------------------------------------------------------------------
case "$compress" in
    none) comp=(cat) ;;
    zstd) comp=(zstd -q -T0 -10) ;;
    gzip) comp=(gzip -6) ;;
    *) echo "build.sh: MEMD_INITRD_COMPRESS must be none, gzip or zstd" >&2; exit 2 ;;
esac
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --quiet --reproducible | "${comp[@]}") > "$out/initrd.img.tmp"
{
    echo "kernel=$kver ($kernel_kind)"
    printf '%s\n' "${pins[@]}"
    echo "compress=$compress"
    echo "initrd_bytes=$(stat -c %s "$out/initrd.img.tmp")"
    echo "unpacked_kib=$(du -sk "$root" | cut -f1)"
    echo "agent_files=$(cd "$agent" && find memd -name '*.py' | LC_ALL=C sort | tr '\n' ' ')"
} > "$out/manifest.txt"
mv "$out/vmlinux.tmp" "$out/vmlinux"
mv "$out/initrd.img.tmp" "$out/initrd.img"
