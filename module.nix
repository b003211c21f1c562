# NixOS module for nix-hash-collection.
#
# services.hash-collection         a builder: reports what it builds to a collection server.
# services.hash-collection-server  the collection server, hardened, with its SQLite database in a StateDirectory.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.hash-collection;
  serverCfg = config.services.hash-collection-server;

  defaultPackage = pkgs.callPackage ./nix/package.nix { };
  packageOption = lib.mkOption {
    type = lib.types.package;
    default = defaultPackage;
    defaultText = lib.literalExpression "pkgs.callPackage ./nix/package.nix { }";
    description = "The nix-hash-collection package.";
  };

  buildUsersGroup = config.nix.settings.build-users-group or "nixbld";

  # The diff hook runs as a build user, who cannot read root's files: it uses
  # copies readable by the build users group, made by hash-collection-secrets.service.
  buildUserSecretsDir = "/run/hash-collection";
  buildUserTokenFile = "${buildUserSecretsDir}/token";
  buildUserSecretKeyFile = "${buildUserSecretsDir}/secret-key";

  # Secrets are passed as file paths; the store only ever holds the paths.
  exportLine = name: value: "export ${name}=${lib.escapeShellArg value}";
  hookScript = name: { tokenFile, secretKeyFile, spool, exports, mode, args ? [ ] }: pkgs.writeShellScript name ''
    ${exportLine "HASH_COLLECTION_SERVER" cfg.collection-url}
    ${exportLine "HASH_COLLECTION_TOKEN_FILE" tokenFile}
    ${lib.optionalString (secretKeyFile != null) (exportLine "HASH_COLLECTION_SECRET_KEY_FILE" secretKeyFile)}
    ${exportLine "HASH_COLLECTION_SPOOL" spool}
    ${lib.concatStringsSep "\n" (lib.mapAttrsToList exportLine exports)}
    export HASH_COLLECTION_TIMEOUT=${toString cfg.timeout}
    exec ${cfg.package}/bin/hash-collection-hook ${lib.concatStringsSep " " ([ mode ] ++ map lib.escapeShellArg args)} "$@"
  '';

  # Root reads (never writes) what the diff hook spooled, and delivers it.
  readsBuildUserSpool = {
    HASH_COLLECTION_BUILD_USER_SPOOL = cfg.buildUserSpoolDir;
    HASH_COLLECTION_BUILD_USERS_GROUP = buildUsersGroup;
  };
  # An explicit diffoscope: Nix runs the diff hook with the daemon's environment, whose PATH
  # need not have one; "none" turns it off even when one happens to be on that PATH.
  diffSettings = {
    HASH_COLLECTION_DIFF_TIMEOUT = toString cfg.diffTimeout;
    HASH_COLLECTION_DIFF_MEMORY_MIB = toString cfg.diffMemoryMiB;
    HASH_COLLECTION_DIFF_OUTPUT_MIB = toString cfg.diffOutputMiB;
    HASH_COLLECTION_DIFFOSCOPE = if cfg.diffoscope.enable then "${cfg.diffoscope.package}/bin/diffoscope" else "none";
  };
  postBuildHook = hookScript "hash-collection-post-build-hook" {
    inherit (cfg) tokenFile secretKeyFile;
    spool = cfg.spoolDir;
    exports = readsBuildUserSpool;
    mode = "";
  };
  diffHook = hookScript "hash-collection-diff-hook" {
    tokenFile = buildUserTokenFile;
    secretKeyFile = if cfg.secretKeyFile == null then null else buildUserSecretKeyFile;
    spool = cfg.buildUserSpoolDir;
    exports = diffSettings;
    mode = "diff-hook";
  };
  flushScript = hookScript "hash-collection-flush" {
    inherit (cfg) tokenFile secretKeyFile;
    spool = cfg.spoolDir;
    exports = readsBuildUserSpool;
    mode = "flush";
  };

  # The log commands keep their state in ${cfg.spoolDir}/log. audit reads no token, but the
  # package's wrapper refuses to run without HASH_COLLECTION_TOKEN_FILE; witness reads the token
  # and its key from files, like the hooks.
  logKeyExport = { HASH_COLLECTION_LOG_KEY = cfg.logKey; };
  auditScript = hookScript "hash-collection-audit" {
    inherit (cfg) tokenFile;
    secretKeyFile = null;
    spool = cfg.spoolDir;
    exports = logKeyExport;
    mode = "audit";
    args = lib.concatMap (key: [ "--witness" key ]) cfg.audit.witnesses
      ++ [ "--min-witnesses" (toString cfg.audit.minWitnesses) ];
  };
  witnessScript = hookScript "hash-collection-witness" {
    inherit (cfg) tokenFile;
    secretKeyFile = null;
    spool = cfg.spoolDir;
    exports = logKeyExport // lib.optionalAttrs (cfg.witnessKeyFile != null) {
      HASH_COLLECTION_WITNESS_KEY_FILE = cfg.witnessKeyFile;
    };
    mode = "witness";
  };
  auditsTheLog = cfg.logKey != null;
  witnessesTheLog = auditsTheLog && cfg.witnessKeyFile != null;

  # Root's jobs on a timer (flush, audit, witness) need the network and root's spool, nothing else.
  spoolJob = description: script: {
    inherit description;
    after = [ "network-online.target" ];
    wants = [ "network-online.target" ];
    serviceConfig = {
      Type = "oneshot";
      ExecStart = "${script}";
      # Runs as root to read the root-only token and keys; it only needs the spool.
      ProtectSystem = "strict";
      ReadWritePaths = [ cfg.spoolDir ];
      # "read-only", not true: a tokenFile under /root or /home must stay readable.
      ProtectHome = "read-only";
      PrivateTmp = true;
      NoNewPrivileges = true;
    };
  };

  # A missing secret or a failed copy fails the unit, where `systemctl --failed` shows it.
  copyForBuildUsers = source: target: ''
    if [ ! -r ${lib.escapeShellArg source} ]; then
      printf 'hash-collection: cannot read %s; the diff hook cannot report until it exists and this unit is restarted\n' ${lib.escapeShellArg source} >&2
      exit 1
    fi
    install -m 0640 -o root -g ${lib.escapeShellArg buildUsersGroup} ${lib.escapeShellArg source} ${lib.escapeShellArg target}
  '';
  secretsCopyScript = ''
    set -euo pipefail
    install -d -m 0750 -o root -g ${lib.escapeShellArg buildUsersGroup} ${lib.escapeShellArg buildUserSecretsDir}
    ${copyForBuildUsers cfg.tokenFile buildUserTokenFile}
    ${lib.optionalString (cfg.secretKeyFile != null) (copyForBuildUsers cfg.secretKeyFile buildUserSecretKeyFile)}
  '';

  inStore = path: path != null && lib.hasPrefix "${builtins.storeDir}/" path;
  notInStore = option: {
    assertion = !(inStore cfg.${option});
    message = "services.hash-collection.${option} is in the Nix store, which every user can read: "
      + "give the path of a file outside it as a string (\"/run/secrets/...\"), not \"\${./file}\", which copies the file into the store.";
  };
  isInside = parent: path: path == parent || lib.hasPrefix "${parent}/" path;

  serverStateDirectory = lib.removePrefix "/var/lib/" serverCfg.dataDir;
  serverDatabase = "${serverCfg.dataDir}/hashes.db";
  serverUser = "hash-collection-server";

  # create_user runs as the service's dynamic user, so the database and its WAL
  # files never end up owned by root, where the service could not write them.
  createUserCommand = pkgs.writeShellScriptBin "create_user" ''
    exec ${pkgs.systemd}/bin/systemd-run --quiet --pipe --wait --collect \
      --property=DynamicUser=yes \
      --property=User=${serverUser} \
      --property=StateDirectory=${serverStateDirectory} \
      --setenv=HASH_COLLECTION_DB=${lib.escapeShellArg serverDatabase} \
      ${serverCfg.package}/bin/create_user "$@"
  '';

  serverArguments = [
    "--host" serverCfg.host
    "--port" (toString serverCfg.port)
    "--db" serverDatabase
  ] ++ lib.optional serverCfg.requireSignatures "--require-signatures"
    ++ lib.optionals (serverCfg.logOrigin != null) [ "--log-origin" serverCfg.logOrigin ]
    # %d is the service's credentials directory, where LoadCredential puts a copy the dynamic user can read.
    ++ lib.optionals (serverCfg.logKeyFile != null) [ "--log-key" "%d/log-key" ];
in
{
  options.services.hash-collection = {
    enable = lib.mkEnableOption "reporting the output hashes of local builds to a nix-hash-collection server";

    package = packageOption;

    collection-url = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "https://hashes.example.org";
      description = "URL of the collection server.";
    };

    tokenFile = lib.mkOption {
      # A string, not a path: a path literal would be copied into the world-readable store.
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/hash-collection-token";
      description = ''
        File holding this builder's token, as printed by `create_user` on the server.
        It is read at run time and never copied into the Nix store.
      '';
    };

    secretKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/var/lib/hash-collection/secret-key";
      description = ''
        File holding this builder's Nix signing key (`nix key generate-secret`).
        Attestations are signed with it; without it they are sent unsigned, and a
        server in verified-only mode rejects them. It is never copied into the Nix store.
      '';
    };

    spoolDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/hash-collection/spool";
      description = ''
        Root's spool: what the post-build hook (root) could not deliver waits here, owned by
        root and mode 0700, until the flush timer delivers it. Earlier versions shared this
        directory with the build users (mode 2770, default /var/spool/hash-collection): a directory
        set here is made root-only again, and files the build users left in it are treated as hostile.
      '';
    };

    buildUserSpoolDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/hash-collection/build-user-spool";
      description = ''
        The build users' spool: what the diff hook (which runs as a build user) could not deliver
        waits here (root, build users group, mode 2770). Root's flush reads it, never writes it.
      '';
    };

    timeout = lib.mkOption {
      type = lib.types.ints.positive;
      default = 5;
      description = ''
        Seconds the hooks wait for the server. The post-build hook blocks Nix's build loop,
        so keep this short: what is not delivered in time is spooled and sent by the flush timer.
      '';
    };

    diffoscope = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Whether the diff hook runs diffoscope on an output and its differing `--check` rebuild, besides
          the file table it always makes. The diff is uploaded to the server and shown there.
        '';
      };
      package = lib.mkOption {
        type = lib.types.package;
        default = pkgs.diffoscopeMinimal;
        defaultText = lib.literalExpression "pkgs.diffoscopeMinimal";
        description = "The diffoscope the diff hook runs.";
      };
    };

    diffTimeout = lib.mkOption {
      type = lib.types.ints.positive;
      default = 60;
      description = ''
        Seconds of diff work (the file walk and diffoscope together) after a `--check` finds a different
        output. Nix waits for the diff hook: it ends within this plus `timeout`.
      '';
    };

    diffMemoryMiB = lib.mkOption {
      type = lib.types.ints.positive;
      default = 2048;
      description = "Address-space limit of diffoscope, in MiB.";
    };

    diffOutputMiB = lib.mkOption {
      type = lib.types.ints.positive;
      default = 4;
      description = "Most diffoscope text kept per diff, in MiB.";
    };

    logKey = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "hashes.example.org+1a2b3c4d+AU...";
      description = ''
        The server's transparency-log verifier key, as `python web.py` prints it at start. Get it out of
        band, not from the server. When set, `audit` runs on a timer. It is public, not a secret.
      '';
    };

    audit = {
      interval = lib.mkOption {
        type = lib.types.str;
        default = "1h";
        description = "How often `audit` checks the log and this builder's entries in it (and `witness` cosigns).";
      };
      witnesses = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        description = "Verifier keys of the witnesses whose cosignatures `audit` counts (see `audit.minWitnesses`).";
      };
      minWitnesses = lib.mkOption {
        type = lib.types.ints.unsigned;
        default = 0;
        description = "How many of `audit.witnesses` must have cosigned the checkpoint for `audit` to pass.";
      };
    };

    witnessKeyFile = lib.mkOption {
      # A string, not a path: a path literal would be copied into the world-readable store.
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/var/lib/hash-collection/witness.key";
      description = ''
        File holding this builder's witness key (`post_build_hook.py witness --generate-key NAME`), read at
        run time and never copied into the Nix store. When set (with `logKey`), `witness` cosigns the log's
        checkpoint every `audit.interval`; the server's admin registers the printed verifier key with
        `create_user NAME --witness-key VKEY`.
      '';
    };
  };

  options.services.hash-collection-server = {
    enable = lib.mkEnableOption "the nix-hash-collection server";

    package = packageOption;

    host = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = "Address the server listens on.";
    };

    port = lib.mkOption {
      type = lib.types.port;
      default = 8000;
      description = "TCP port the server listens on.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Whether to open `port` in the firewall.";
    };

    dataDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/hash-collection-server";
      description = ''
        Directory holding the SQLite database `hashes.db`. It must lie under /var/lib,
        because systemd creates it as the service's StateDirectory.
      '';
    };

    requireSignatures = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Verified-only mode: reject attestations that are not signed by a key
        registered for their builder (`create_user NAME --public-key KEY`).
      '';
    };

    logOrigin = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "hashes.example.org";
      description = ''
        The transparency log's origin line (`--log-origin`); null leaves web.py's default, this host's name.
        Set it to the server's public name before the first checkpoint: builders pin it.
      '';
    };

    logKeyFile = lib.mkOption {
      # A string, not a path: a path literal would be copied into the world-readable store.
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/hash-collection-log-key";
      description = ''
        An existing file holding the log's signer key, passed to the service with `LoadCredential` (so the
        dynamic user can read a root-only file) and never copied into the Nix store. Null keeps the key next
        to the database, `hashes.db.log-key` in `dataDir`, which the server creates (mode 0600) on first start.
      '';
    };
  };

  config = lib.mkMerge [
    (lib.mkIf cfg.enable {
      assertions = [
        {
          assertion = cfg.collection-url != null;
          message = "services.hash-collection.collection-url must be set to the collection server's URL.";
        }
        {
          assertion = cfg.tokenFile != null && lib.hasPrefix "/" cfg.tokenFile;
          message = "services.hash-collection.tokenFile must be set to the absolute path of the file holding this builder's token.";
        }
        {
          assertion = cfg.secretKeyFile == null || lib.hasPrefix "/" cfg.secretKeyFile;
          message = "services.hash-collection.secretKeyFile must be an absolute path.";
        }
        {
          assertion = cfg.witnessKeyFile == null || (lib.hasPrefix "/" cfg.witnessKeyFile && cfg.logKey != null);
          message = "services.hash-collection.witnessKeyFile must be an absolute path, and needs logKey: "
            + "a witness checks the log's checkpoint against the log's verifier key before it cosigns.";
        }
        {
          assertion = cfg.audit.minWitnesses <= builtins.length cfg.audit.witnesses;
          message = "services.hash-collection.audit.minWitnesses must not exceed the number of audit.witnesses.";
        }
        (notInStore "tokenFile")
        (notInStore "secretKeyFile")
        (notInStore "witnessKeyFile")
        {
          assertion = lib.hasPrefix "/" cfg.spoolDir && lib.hasPrefix "/" cfg.buildUserSpoolDir
            && !(isInside cfg.spoolDir cfg.buildUserSpoolDir) && !(isInside cfg.buildUserSpoolDir cfg.spoolDir);
          message = "services.hash-collection.spoolDir and buildUserSpoolDir must be two separate absolute directories, "
            + "neither inside the other: root must never share a writable spool with the build users.";
        }
      ];

      warnings = lib.optional (config.nix.settings.auto-allocate-uids or false) (
        "services.hash-collection: nix.settings.auto-allocate-uids is on, so builds run with a group of their own "
        + "instead of ${buildUsersGroup}: the diff hook cannot read the secret copies in ${buildUserSecretsDir} "
        + "or write ${cfg.buildUserSpoolDir}, and will report unsigned or not at all. The post-build hook is not affected.");

      nix.settings = {
        post-build-hook = postBuildHook;
        diff-hook = diffHook;
        run-diff-hook = true;
      };

      environment.systemPackages = [ cfg.package ];

      # `d` also resets the mode and owner of a directory that already exists.
      systemd.tmpfiles.rules = [
        "d ${cfg.spoolDir} 0700 root root - -"
        "d ${cfg.buildUserSpoolDir} 2770 root ${buildUsersGroup} - -"
      ];

      # A service, not an activation script: with systemd-sysusers or userborn the
      # build users group only exists once their service ran.
      # Trade-off: the copies are readable by every build user. With the sandbox
      # (NixOS's default) builds cannot see /run; without it, a build could read them.
      systemd.services.hash-collection-secrets = {
        description = "Copy the nix-hash-collection secrets for the diff hook, which runs as a build user";
        wantedBy = [ "multi-user.target" "nix-daemon.service" ];
        before = [ "nix-daemon.service" ];
        after = [ "systemd-sysusers.service" "userborn.service" "local-fs.target" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
        };
        script = secretsCopyScript;
      };

      systemd.services.hash-collection-flush = spoolJob "Deliver spooled nix-hash-collection attestations" flushScript;

      systemd.timers.hash-collection-flush = {
        description = "Deliver spooled nix-hash-collection attestations every few minutes";
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnBootSec = "2min";
          OnUnitActiveSec = "5min";
          RandomizedDelaySec = "30s";
        };
      };

      # audit exits 2 when the log broke a promise: the unit fails, which monitoring should alert on.
      systemd.services.hash-collection-audit = lib.mkIf auditsTheLog
        (spoolJob "Audit the nix-hash-collection transparency log and this builder's entries in it" auditScript);
      systemd.timers.hash-collection-audit = lib.mkIf auditsTheLog {
        description = "Audit the nix-hash-collection transparency log regularly";
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnBootSec = "10min";
          OnUnitActiveSec = cfg.audit.interval;
          RandomizedDelaySec = "5min";
        };
      };

      systemd.services.hash-collection-witness = lib.mkIf witnessesTheLog
        (spoolJob "Cosign the nix-hash-collection transparency log's checkpoint" witnessScript);
      systemd.timers.hash-collection-witness = lib.mkIf witnessesTheLog {
        description = "Cosign the nix-hash-collection transparency log's checkpoint regularly";
        wantedBy = [ "timers.target" ];
        # Before the audit, so that audits requiring witnesses find fresh cosignatures.
        timerConfig = {
          OnBootSec = "8min";
          OnUnitActiveSec = cfg.audit.interval;
          RandomizedDelaySec = "1min";
        };
      };
    })

    (lib.mkIf serverCfg.enable {
      assertions = [
        {
          assertion = lib.hasPrefix "/var/lib/" serverCfg.dataDir && serverStateDirectory != "";
          message = "services.hash-collection-server.dataDir must lie under /var/lib/ (it is the service's StateDirectory).";
        }
        {
          assertion = serverCfg.logKeyFile == null || (lib.hasPrefix "/" serverCfg.logKeyFile && !(inStore serverCfg.logKeyFile));
          message = "services.hash-collection-server.logKeyFile must be an absolute path outside the Nix store, which every user can read.";
        }
      ];

      # Wins over the package's own create_user, which acts on ./hashes.db, when a machine is also a builder.
      environment.systemPackages = [ (lib.hiPrio createUserCommand) ];

      networking.firewall.allowedTCPPorts = lib.optional serverCfg.openFirewall serverCfg.port;

      systemd.services.hash-collection-server = {
        description = "nix-hash-collection server";
        wantedBy = [ "multi-user.target" ];
        after = [ "network.target" ];
        serviceConfig = {
          ExecStart = "${serverCfg.package}/bin/hash-collection-server ${lib.escapeShellArgs serverArguments}";
          Restart = "on-failure";
          DynamicUser = true;
          User = serverUser;
          StateDirectory = serverStateDirectory;
          StateDirectoryMode = "0750";
          WorkingDirectory = serverCfg.dataDir;
          LoadCredential = lib.optional (serverCfg.logKeyFile != null) "log-key:${serverCfg.logKeyFile}";

          # Hardening: the server needs its state directory, a listening socket and nothing else.
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          PrivateUsers = true;
          NoNewPrivileges = true;
          CapabilityBoundingSet = "";
          AmbientCapabilities = "";
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          ProtectProc = "invisible";
          ProcSubset = "pid";
          RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          RemoveIPC = true;
          SystemCallArchitectures = "native";
          # setpriority, of @resources, is allowed again: the render worker lowers its own priority
          # (os.nice), and a call the filter denies would kill it, and with it every report view.
          SystemCallFilter = [ "@system-service" "~@privileged" "~@resources" "setpriority" ];
          # A call denied fails with EPERM rather than killing the process, which web.py can survive.
          SystemCallErrorNumber = "EPERM";
          UMask = "0077";
          # MemoryDenyWriteExecute is left off: cffi (under pynacl) may need
          # writable and executable memory for callbacks.
        };
      };
    })
  ];
}
