#!/usr/bin/env bash
# Installs the hash-collection post-build hook and diff hook on a builder that is not NixOS
# (NixOS uses module.nix), or removes them again with --uninstall.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: sudo ./install-hook.sh --server URL --token-file FILE [--key-file FILE] [options]
       sudo ./install-hook.sh --uninstall [--conf-dir DIR] [--prefix DIR] [--state-dir DIR]

Installs the client into the prefix, gives the build users their own copies of the token and key,
makes the spools, adds post-build-hook, diff-hook and run-diff-hook to nix.conf (showing the change
first), then builds a trivial derivation and looks for its attestation on the server.

  --server URL        the collection server, e.g. https://hashes.example.org
  --token-file FILE   file holding this builder's token (from create_user)
  --key-file FILE     this builder's Nix signing key (nix key generate-secret); unsigned without it
  --conf-dir DIR      Nix's configuration directory (default /etc/nix)
  --prefix DIR        where the client and the hooks go (default /opt/hash-collection)
  --state-dir DIR     credentials and spools (default /var/lib/hash-collection)
  --python FILE       a Python with requests and nacl that the build users can run (default /usr/bin/python3)
  --yes               change nix.conf without asking
  --no-check          skip the check build
  --uninstall         remove what an earlier install added; spools holding submissions stay
  --help              this text
EOF
}

BLOCK_BEGIN="# hash-collection: begin (written by install-hook.sh; install-hook.sh --uninstall removes it)"
BLOCK_END="# hash-collection: end"
CLIENT_FILES=(post_build_hook.py hook-wrapper.sh run-client.py post-build-hook diff-hook)
CHECK_DEADLINE=30

here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
mode=install
server=""
token_file=""
key_file=""
conf_dir=/etc/nix
prefix=/opt/hash-collection
state_dir=/var/lib/hash-collection
python=/usr/bin/python3
assume_yes=false
run_check=true
work=""

die() {
    echo "install-hook.sh: $*" >&2
    exit 1
}

usage_error() {
    echo "install-hook.sh: $*" >&2
    usage >&2
    exit 2
}

parse_arguments() {
    while [ "$#" -gt 0 ]; do
        case "$1" in
            --help | -h) usage; exit 0 ;;
            --uninstall) mode=uninstall ;;
            --yes) assume_yes=true ;;
            --no-check) run_check=false ;;
            --server | --token-file | --key-file | --conf-dir | --prefix | --state-dir | --python)
                [ "$#" -ge 2 ] || usage_error "$1 needs a value"
                set_option "$1" "$2"
                shift ;;
            *) usage_error "unknown argument: $1" ;;
        esac
        shift
    done
}

set_option() {
    case "$1" in
        --server) server=$2 ;;
        --token-file) token_file=$2 ;;
        --key-file) key_file=$2 ;;
        --conf-dir) conf_dir=$2 ;;
        --prefix) prefix=$2 ;;
        --state-dir) state_dir=$2 ;;
        --python) python=$2 ;;
    esac
}

# These paths end up in nix.conf and in shell scripts: plain characters keep both unambiguous.
check_plain_path() {
    local option=$1 path=$2
    [[ "$path" =~ ^/[A-Za-z0-9/._+-]*$ ]] ||
        usage_error "$option must be an absolute path of letters, digits and / . _ + - (got '$path')"
}

check_arguments() {
    check_plain_path --conf-dir "$conf_dir"
    check_plain_path --prefix "$prefix"
    check_plain_path --state-dir "$state_dir"
    [ "$mode" = uninstall ] && return
    [ -n "$server" ] || usage_error "--server is required"
    [ -n "$token_file" ] || usage_error "--token-file is required"
    [[ "$server" =~ ^https?://[^[:space:]\'\"]+$ ]] || usage_error "--server must be an http:// or https:// URL (got '$server')"
    check_plain_path --python "$python"
}

sh_quote() {
    local squote="'"
    printf "'%s'" "${1//$squote/$squote\\$squote$squote}"
}

nix_here() {
    NIX_CONF_DIR=$conf_dir "$@"
}

nix_setting() {
    local name=$1 shown
    shown=$(nix_here nix --extra-experimental-features nix-command show-config 2>/dev/null ||
        nix_here nix --extra-experimental-features nix-command config show) ||
        die "cannot read Nix's settings with NIX_CONF_DIR=$conf_dir (is Nix installed?)"
    printf '%s\n' "$shown" | sed -n "s/^$name = //p"
}

build_users_group() {
    local group
    group=$(nix_setting build-users-group)
    [ -n "$group" ] || die "build-users-group is empty in Nix's settings: builds run as the user who starts them," \
        "so the diff hook would too; set build-users-group (Debian's nix-setup-systemd makes nixbld)"
    getent group "$group" >/dev/null || die "build-users-group is '$group', but there is no such group"
    printf '%s\n' "$group"
}

check_python() {
    [ -x "$python" ] || die "--python $python is not an executable file"
    "$python" -I -c 'import nacl.signing, requests' 2>/dev/null ||
        die "$python cannot import requests and nacl: on Debian, apt-get install python3-requests python3-nacl"
}

check_token_file() {
    [ -r "$token_file" ] || die "cannot read the token file $token_file"
    [ -s "$token_file" ] || die "the token file $token_file is empty"
}

# Prints the public key, or fails naming the file when it is not a Nix secret key.
public_key_of() {
    local key=$1 public
    [ -r "$key" ] || die "cannot read the key file $key"
    [ -s "$key" ] || die "the key file $key is empty (did 'nix key generate-secret' fail?)"
    public=$(nix_here nix --extra-experimental-features nix-command key convert-secret-to-public <"$key" 2>&1) ||
        die "the key file $key is not a Nix secret key: $public"
    printf '%s\n' "$public"
}

# ---------------------------------------------------------------- nix.conf

hook_block() {
    printf '%s\n' "$BLOCK_BEGIN" \
        "post-build-hook = $prefix/post-build-hook" \
        "diff-hook = $prefix/diff-hook" \
        "run-diff-hook = true" \
        "$BLOCK_END"
}

# Writes nix.conf without the block an earlier install wrote to $2.
conf_without_block() {
    local conf=$1 target=$2
    if [ ! -e "$conf" ]; then
        : >"$target"
        return
    fi
    awk -v begin="$BLOCK_BEGIN" -v end="$BLOCK_END" '
        $0 == begin { inside = 1; next }
        inside && $0 == end { inside = 0; next }
        !inside { print }
        END { if (inside) exit 3 }' "$conf" >"$target" ||
        die "$conf has the line '$BLOCK_BEGIN' but not '$BLOCK_END' after it: repair it by hand"
}

refuse_foreign_hooks() {
    local conf=$1 stripped=$2 foreign
    foreign=$(grep -E '^[[:space:]]*(post-build-hook|diff-hook)[[:space:]]*=' "$stripped" || true)
    [ -z "$foreign" ] && return
    die "refusing to change $conf: it already has a hook that install-hook.sh did not write:" \
        "'$(head -n 1 <<<"$foreign")'. Remove or comment out that line, then run install-hook.sh again."
}

show_change() {
    local conf=$1 new=$2
    local old=$conf
    [ -e "$conf" ] || old=/dev/null
    diff -u --label "$conf" --label "$conf (new)" "$old" "$new" || true
}

confirm() {
    local question=$1 answer
    "$assume_yes" && return
    [ -t 0 ] || die "nothing changed: stdin is not a terminal, so run again with --yes to apply this"
    read -r -p "$question [y/N] " answer
    [[ "$answer" =~ ^[Yy] ]] || die "nothing changed"
}

# Replaces nix.conf in one rename, keeping its owner and mode.
replace_file() {
    local target=$1 content=$2 temporary
    temporary=$(mktemp "$(dirname "$target")/.nix.conf.XXXXXX")
    cat "$content" >"$temporary"
    if [ -e "$target" ]; then
        chown --reference="$target" "$temporary"
        chmod --reference="$target" "$temporary"
    else
        chmod 0644 "$temporary"
    fi
    mv -f "$temporary" "$target"
}

refuse_symlinked_conf() {
    local conf=$1
    [ ! -L "$conf" ] || die "$conf is a symbolic link (to $(readlink -f "$conf")): give its directory as --conf-dir"
}

# ---------------------------------------------------------------- files

# Root writes into these and trusts what is in them: only root may have been able to write there before.
refuse_unsafe_directories() {
    local directory owner mode
    for directory in "$prefix" "$prefix/__pycache__" "$state_dir" "$state_dir/credentials" "$state_dir/spool"; do
        [ -e "$directory" ] || [ -L "$directory" ] || continue
        if [ -L "$directory" ] || [ ! -d "$directory" ]; then
            die "$directory exists and is not a directory"
        fi
        read -r owner mode < <(stat -c '%u %a' "$directory")
        if [ "$owner" != 0 ] || (( 8#$mode & 8#022 )); then
            die "$directory already exists, owned by uid $owner with mode $mode: someone other than root could" \
                "have put files there. Move it away (or empty it and make it root's, mode 0700), then run again."
        fi
    done
}

install_client() {
    local group=$1
    install -d -m 0755 -o root -g root "$prefix"
    install -C -m 0755 -o root -g root "$here/post_build_hook.py" "$prefix/post_build_hook.py"
    install -C -m 0755 -o root -g root "$here/nix/hook-wrapper.sh" "$prefix/hook-wrapper.sh"
    install -C -m 0644 -o root -g root "$here/nix/run-client.py" "$prefix/run-client.py"
    # Its bytecode, which run-client.py loads instead of compiling the client at every run; readable by the build
    # users, whose diff hook runs it too. Compiled afresh: none left by another Python stays.
    install -d -m 0755 -o root -g root "$prefix/__pycache__"
    rm -f "$prefix"/__pycache__/post_build_hook.*.pyc
    "$python" -I -m py_compile "$prefix/post_build_hook.py"
    chmod 0644 "$prefix"/__pycache__/post_build_hook.*.pyc
    write_launcher post-build-hook "" "$state_dir/spool" \
        "export HASH_COLLECTION_BUILD_USER_SPOOL=$(sh_quote "$state_dir/build-user-spool")" \
        "export HASH_COLLECTION_BUILD_USERS_GROUP=$(sh_quote "$group")"
    write_launcher diff-hook "diff-hook " "$state_dir/build-user-spool"
}

# A launcher sets the hook's environment and runs hook-wrapper.sh, which reads the secrets from files.
write_launcher() {
    local name=$1 subcommand=$2 spool=$3 temporary
    shift 3
    temporary=$(mktemp)
    {
        echo "#!/bin/sh"
        echo "# Nix's $name for hash-collection, written by install-hook.sh."
        echo "export HASH_COLLECTION_SERVER=$(sh_quote "$server")"
        echo "export HASH_COLLECTION_TOKEN_FILE=$(sh_quote "$state_dir/credentials/token")"
        if [ -n "$key_file" ]; then
            echo "export HASH_COLLECTION_SECRET_KEY_FILE=$(sh_quote "$state_dir/credentials/secret-key")"
        fi
        echo "export HASH_COLLECTION_SPOOL=$(sh_quote "$spool")"
        [ "$#" -eq 0 ] || printf '%s\n' "$@"
        echo "export HASH_COLLECTION_PYTHON=$(sh_quote "$python")"
        echo "export HASH_COLLECTION_CLIENT=$(sh_quote "$prefix/post_build_hook.py")"
        echo "exec $(sh_quote "$prefix/hook-wrapper.sh") $subcommand\"\$@\""
    } >"$temporary"
    install -C -m 0755 -o root -g root "$temporary" "$prefix/$name"
    rm -f "$temporary"
}

# The diff hook runs as a build user, who may not read the originals: both hooks use these copies.
install_credentials() {
    local group=$1 credentials=$state_dir/credentials
    install -d -m 0755 -o root -g root "$state_dir"
    install -d -m 0750 -o root -g "$group" "$credentials"
    install -C -m 0640 -o root -g "$group" "$token_file" "$credentials/token"
    if [ -n "$key_file" ]; then
        install -C -m 0640 -o root -g "$group" "$key_file" "$credentials/secret-key"
    else
        rm -f "$credentials/secret-key"
    fi
}

# Root and the build users never share a writable spool: the post-build hook (root) only reads theirs.
install_spools() {
    local group=$1
    install -d -m 0700 -o root -g root "$state_dir/spool"
    install -d -m 2770 -o root -g "$group" "$state_dir/build-user-spool"
}

# ---------------------------------------------------------------- the check

check_installation() {
    local nonce expression out_path log
    nonce=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    expression="derivation { name = \"hash-collection-install-check\"; system = builtins.currentSystem;
      builder = \"/bin/sh\"; args = [ \"-c\" \"echo $nonce > \$out\" ]; }"
    log=$(mktemp)
    echo "checking: building a trivial derivation with NIX_CONF_DIR=$conf_dir ..."
    if ! out_path=$(nix_here nix-build --no-out-link -E "$expression" 2>"$log"); then
        cat "$log" >&2
        rm -f "$log"
        die "the check build failed (see above); the hook is installed"
    fi
    if ! attestation_on_server "$out_path"; then
        cat "$log" >&2
        rm -f "$log"
        die "the hook is installed, but the server has no attestation of $out_path (the build's output is above)"
    fi
    rm -f "$log"
}

# Asks the server for the attestation of one output path; prints what it found.
attestation_on_server() {
    local out_path=$1
    timeout "$CHECK_DEADLINE" "$python" -I - "$prefix" "$server" "$out_path" "$key_file" <<'EOF'
import json, os, sys
prefix, server, out_path, key_file = sys.argv[1:]
sys.path.insert(0, prefix)
from post_build_hook import http_request  # the installed client's: a deadline, a size cap, no redirects
url = f"{server.rstrip('/')}/attestations/by-output/{os.path.basename(out_path)}"
try:
    answer = http_request("GET", url, 10, 1 << 20)
    if answer.status_code != 200:
        sys.exit(f"cannot read {url}: {answer.status_code} {answer.reason}")
    attestations = json.loads(answer.body)
except Exception as error:  # noqa: BLE001 - any failure is the check's answer
    sys.exit(f"cannot read {url}: {error}")
if not isinstance(attestations, list) or not attestations:
    sys.exit(f"the server has no attestation of {out_path}")
if any(attestation.get("verified") for attestation in attestations):
    print(f"ok: the server has a signed, verified attestation of {out_path}")
elif key_file:
    sys.exit(f"the server has an attestation of {out_path}, but its signature is not verified:"
             " register this builder's public key (create_user NAME --public-key KEY)")
else:
    print(f"ok: the server has an unsigned attestation of {out_path} (no --key-file)")
EOF
}

# ---------------------------------------------------------------- install and uninstall

install_hook() {
    local conf=$conf_dir/nix.conf group public_key=""
    [ -d "$conf_dir" ] || die "--conf-dir $conf_dir is not a directory"
    refuse_symlinked_conf "$conf"
    check_python
    check_token_file
    [ -z "$key_file" ] || public_key=$(public_key_of "$key_file")
    group=$(build_users_group)
    refuse_unsafe_directories
    conf_without_block "$conf" "$work/stripped"
    refuse_foreign_hooks "$conf" "$work/stripped"
    { cat "$work/stripped"; hook_block; } >"$work/new"
    local conf_changes=true
    if [ -e "$conf" ] && cmp -s "$conf" "$work/new"; then
        conf_changes=false
        echo "$conf already has the hook settings"
    else
        show_change "$conf" "$work/new"
        confirm "Apply this change to $conf?"
    fi
    install_credentials "$group"
    install_spools "$group"
    install_client "$group"
    if "$conf_changes"; then
        replace_file "$conf" "$work/new"
    fi
    report_installed "$group" "$public_key"
    if "$run_check"; then
        check_installation
    fi
}

report_installed() {
    local group=$1 public_key=$2
    echo "installed the hooks in $prefix (build users group: $group)"
    echo "spools: $state_dir/spool (post-build hook), $state_dir/build-user-spool (diff hook)"
    echo "deliver what waits in the spools: sudo $prefix/post-build-hook flush"
    if [ -n "$public_key" ]; then
        echo "this builder's public key (the server admin registers it with create_user NAME --public-key KEY):"
        echo "  $public_key"
    fi
    if [ "$conf_dir" = /etc/nix ] && [ -S /nix/var/nix/daemon-socket/socket ]; then
        echo "nix-daemon reads nix.conf only when it starts: restart it (systemctl restart nix-daemon)" \
            "so that builds of other users are reported too"
    fi
}

uninstall_hook() {
    local conf=$conf_dir/nix.conf
    refuse_symlinked_conf "$conf"
    conf_without_block "$conf" "$work/stripped"
    if [ -e "$conf" ] && ! cmp -s "$conf" "$work/stripped"; then
        show_change "$conf" "$work/stripped"
        if [ -s "$work/stripped" ]; then
            replace_file "$conf" "$work/stripped"
        else
            rm -f "$conf"
        fi
    else
        echo "$conf has no lines from install-hook.sh"
    fi
    for name in "${CLIENT_FILES[@]}"; do
        rm -f "${prefix:?}/$name"
    done
    rm -f "${prefix:?}"/__pycache__/post_build_hook.*.pyc
    rmdir "$prefix/__pycache__" 2>/dev/null || true
    rmdir "$prefix" 2>/dev/null || true
    rm -f "$state_dir/credentials/token" "$state_dir/credentials/secret-key"
    rmdir "$state_dir/credentials" 2>/dev/null || true
    remove_spool_unless_waiting "$state_dir/spool"
    remove_spool_unless_waiting "$state_dir/build-user-spool"
    rmdir "$state_dir" 2>/dev/null || true
    echo "uninstalled the hooks from $prefix"
}

# Submissions are the spool's *.json files and rejected/'s; log/ keeps what audit, witness and monitor remember
# of the log; tmp/ and the ledger are the hook's working files.
remove_spool_unless_waiting() {
    local spool=$1 waiting
    [ -d "$spool" ] || return 0
    waiting=$(find "$spool" -maxdepth 2 -type f -name '*.json' ! -path "$spool/tmp/*" ! -path "$spool/log/*" | wc -l)
    if [ "$waiting" -gt 0 ]; then
        echo "kept $spool: it holds $waiting submission(s) not delivered yet or rejected by the server." \
            "To deliver them, install again and run '$prefix/post-build-hook flush'; or delete the directory."
    elif [ -n "$(find "$spool/log" -type f -size +0 2>/dev/null | head -n 1)" ]; then
        find "$spool" -mindepth 1 -maxdepth 1 ! -name log -exec rm -r {} +
        echo "kept $spool/log: what 'post_build_hook.py audit', 'witness' and 'monitor' remember of the log" \
            "(this builder's log indexes, the checkpoints they last checked), with HASH_COLLECTION_SPOOL=$spool;" \
            "delete it if you will not check the log from here again."
    else
        rm -r "$spool"
    fi
}

main() {
    parse_arguments "$@"
    check_arguments
    [ "$(id -u)" = 0 ] || die "run as root (sudo): the hooks, credentials and spools belong to root"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    if [ "$mode" = uninstall ]; then
        uninstall_hook
    else
        install_hook
    fi
}

main "$@"
