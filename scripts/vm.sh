# The virtual machine of scripts/cgroup-v2-test and scripts/compose-v2-test: Debian's cloud
# kernel under qemu (the processor emulated: no KVM needed), a busybox init, and a disk made from
# a directory. Sourced, as root, with $out set (the machine's files go there).

# Installs qemu, busybox, e2fsprogs and uidmap where missing.
vm_install_tools() {
  local missing=()
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  [ -x /bin/busybox ] && /bin/busybox --list | grep -qx switch_root || missing+=(busybox-static)
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
  command -v newuidmap >/dev/null || missing+=(uidmap)
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

# Downloads Debian's cloud kernel of suite $1 (not installed: unpacked in $out); sets
# kernel_dir, vmlinuz and version. A private apt state: the host's sources and package database
# are not touched.
vm_fetch_kernel() {
  local suite=$1 apt_dir=$out/apt kernel_pkg
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  echo "deb http://deb.debian.org/debian $suite main" >"$apt_dir/sources.list"
  local apt_opts=(-o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache"
    -o Dir::State::Status=/dev/null -o APT::Sandbox::User=root)
  apt-get "${apt_opts[@]}" update -qq
  kernel_pkg=$(apt-cache "${apt_opts[@]}" depends linux-image-cloud-amd64 |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$kernel_pkg" ] || { echo "error: no linux-image-cloud-amd64 in $suite" >&2; exit 1; }
  kernel_dir=$out/$kernel_pkg
  if [ ! -d "$kernel_dir" ]; then
    (cd "$apt_dir" && rm -f ./*.deb && apt-get "${apt_opts[@]}" download -qq "$kernel_pkg")
    dpkg-deb -x "$apt_dir"/"$kernel_pkg"_*.deb "$kernel_dir.part"
    mv "$kernel_dir.part" "$kernel_dir"
  fi
  vmlinuz=$(ls "$kernel_dir"/boot/vmlinuz-*)
  version=${vmlinuz##*/vmlinuz-}
}

# Unpacks this host's AppArmor package (its parser links only libc, which the machine gets from
# this host) into $out/apparmor; sets apparmor.
vm_fetch_apparmor() {
  apparmor=$out/apparmor
  if [ ! -x "$apparmor/sbin/apparmor_parser" ]; then
    mkdir -p "$out/apparmor-deb"
    (cd "$out/apparmor-deb" && rm -f ./*.deb && apt-get download -qq apparmor 2>/dev/null)
    rm -rf "$apparmor" && dpkg-deb -x "$out"/apparmor-deb/apparmor_*.deb "$apparmor"
  fi
}

# Makes the machine's root directory $1: busybox, the users (root, runner with a subordinate
# range, solo without one, nobody), the time zone, and AppArmor's parser with its includes and the worker's
# profile. The caller adds its programs, then calls vm_copy_libs.
vm_make_root() {
  local root=$1
  rm -rf "$root" && mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,opt/pyrunner,etc}
  mkdir -p "$root"/{proc,sys,dev,tmp,run,var/lib/pyrunner,mnt}
  for dir in bin sbin lib lib64; do ln -s "usr/$dir" "$root/$dir"; done
  cp /bin/busybox "$root/usr/bin/busybox"
  printf '%s\n' root:x:0:0:root:/root:/bin/sh runner:x:1000:1000:runner:/tmp:/bin/sh \
    solo:x:1001:1001:solo:/tmp:/bin/sh nobody:x:65534:65534:nobody:/nonexistent:/bin/false \
    >"$root/etc/passwd"
  printf '%s\n' root:x:0: runner:x:1000: solo:x:1001: nogroup:x:65534: >"$root/etc/group"
  # The rootless start's user has a subordinate range, as useradd gives one.
  echo runner:100000:65536 | tee "$root/etc/subuid" >"$root/etc/subgid"
  cp -L /etc/localtime "$root/etc/localtime"
  cp "$apparmor/sbin/apparmor_parser" "$root/usr/sbin/"
  mkdir -p "$root/etc/apparmor.d" "$root/etc/apparmor"
  # The parser warns without its configuration (and dockerd misreads its version then).
  touch "$root/etc/apparmor/parser.conf"
  cp -a "$apparmor"/etc/apparmor.d/{abi,abstractions,tunables} "$root/etc/apparmor.d/"
  cp "$repo/deploy/apparmor/pyrunner-worker" "$root/etc/apparmor.d/"
}

# Copies into root $1 the shared libraries of the programs in $root/opt/pyrunner,
# $root/usr/sbin, $root/usr/bin (busybox aside), $root/usr/libexec and the further directories
# given (of the root), and of the Python runtime if it is there, at their real paths (this host
# keeps /lib in /usr, as the machine does); then the loader's cache.
vm_copy_libs() {
  local root=$1
  shift
  local dirs=("$root"/opt/pyrunner "$root"/usr/sbin "$root"/usr/bin "$@")
  [ -d "$root/usr/libexec" ] && dirs+=("$root/usr/libexec")
  {
    find "${dirs[@]}" -type f ! -name busybox
    if [ -d "$root$PYRUNNER_RUNTIME_DIR" ]; then
      find "$PYRUNNER_RUNTIME_DIR" -type f \( -name '*.so' -o -name '*.so.*' -o -path '*/bin/python3*' \)
    fi
  } | while read -r elf; do
    # (Static programs and scripts have none: ldd fails on them.)
    { LD_LIBRARY_PATH=$PYRUNNER_RUNTIME_DIR/python/lib ldd "$elf" 2>/dev/null || true; } |
      awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
  done | sort -u | while read -r lib; do
    case $lib in "$PYRUNNER_RUNTIME_DIR"/*) continue ;; esac
    cp -L --parents "$(readlink -f "$lib")" "$root/"
    [ -e "$root$lib" ] || { mkdir -p "$root$(dirname "$lib")"; ln -sf "$(readlink -f "$lib")" "$root$lib"; }
  done
  touch "$root/etc/ld.so.conf" && ldconfig -r "$root"
}

# Boots the machine: root directory $1, whose executable /checks is its init, with $2 MiB of
# memory and $3 MiB free on its disk. The console goes to $out/console.log.
vm_boot() {
  local root=$1 memory=$2 free=$3 initramfs=$out/initramfs
  # The initramfs loads the disk's driver, a module in this kernel, and switches to the disk.
  rm -rf "$initramfs" && mkdir -p "$initramfs"/{bin,dev,proc,sys,newroot}
  cp /bin/busybox "$initramfs/bin/busybox"
  xz -dc "$(find "$kernel_dir" -name 'virtio_blk.ko*')" >"$initramfs/virtio_blk.ko"
  cat >"$initramfs/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox insmod /virtio_blk.ko
/bin/busybox mount -t ext4 /dev/vda /newroot
exec /bin/busybox switch_root /newroot /checks
EOF
  chmod 755 "$initramfs/init"
  (cd "$initramfs" && find . | /bin/busybox cpio -o -H newc 2>/dev/null) >"$out/initramfs.cpio"
  rm -f "$out/disk.img"
  mkfs.ext4 -q -F -L pyrunner -d "$root" "$out/disk.img" "$(($(du -sm "$root" | cut -f1) + free))M"
  # Single-threaded emulation, a processor without cmpxchg16b for the kernel: qemu 7.2's
  # multi-threaded TCG and its cmpxchg16b each crashed this kernel.
  timeout 3600 qemu-system-x86_64 -machine q35 -accel tcg,thread=single -cpu Nehalem -smp 2 \
    -m "$memory" -nographic -no-reboot -nic none -kernel "$vmlinuz" -initrd "$out/initramfs.cpio" \
    -drive "file=$out/disk.img,format=raw,if=virtio" \
    -append "console=ttyS0 panic=-1 quiet clearcpuid=cx16" | tee "$out/console.log"
}
