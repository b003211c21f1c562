# The nix-hash-collection application: server, client and scripts, as laid out in
# the repository, under share/nix-hash-collection, with commands in bin/.
# Used by flake.nix (packages.default, overlays.default) and module.nix.
{ lib, stdenvNoCC, makeWrapper, bash, python3, nix }:
let
  python = python3.withPackages (ps: [ ps.flask ps.waitress ps.requests ps.pynacl ps.google-re2 ps.msgspec ]);
in
stdenvNoCC.mkDerivation {
  pname = "nix-hash-collection";
  version = "0.1.0";

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../web.py
      ../schema.sql
      ../templates
      ../create_user
      ../create_user.py
      ../post_build_hook.py
      ../fetch-from-cache.sh
      ../rebuilder.sh
      # create_user, fetch-from-cache.sh and rebuilder.sh source it first.
      ../scripts/python.sh
      ./hook-wrapper.sh
      ./run-client.py
    ];
  };

  nativeBuildInputs = [ makeWrapper ];
  # patchShebangs rewrites the scripts' interpreters to these.
  buildInputs = [ bash python ];

  dontBuild = true;

  installPhase = ''
    runHook preInstall

    share=$out/share/nix-hash-collection
    mkdir -p "$share" "$out/bin"
    cp -r . "$share"
    chmod +x "$share"/create_user "$share"/fetch-from-cache.sh "$share"/rebuilder.sh "$share"/nix/hook-wrapper.sh
    # The hooks run the client from this bytecode (nix/run-client.py); checked against the source's hash, as the
    # store resets every file's time.
    ${python.interpreter} -m compileall -q --invalidation-mode checked-hash "$share/post_build_hook.py"

    makeWrapper ${python.interpreter} "$out/bin/hash-collection-server" \
      --add-flags "$share/web.py"
    makeWrapper "$share/create_user" "$out/bin/create_user" \
      --set PYTHON ${python.interpreter}
    # The hooks use the system's Nix first, the one this package was built with last.
    makeWrapper ${python.interpreter} "$out/bin/hash-collection-client" \
      --add-flags "$share/post_build_hook.py" \
      --suffix PATH : ${lib.makeBinPath [ nix ]}
    makeWrapper "$share/nix/hook-wrapper.sh" "$out/bin/hash-collection-hook" \
      --set-default HASH_COLLECTION_PYTHON ${python.interpreter} \
      --set-default HASH_COLLECTION_CLIENT "$share/post_build_hook.py" \
      --suffix PATH : ${lib.makeBinPath [ nix ]}
    for script in fetch-from-cache.sh rebuilder.sh; do
      makeWrapper "$share/$script" "$out/bin/$script" \
        --prefix PATH : ${lib.makeBinPath [ python ]} \
        --suffix PATH : ${lib.makeBinPath [ nix ]}
    done

    runHook postInstall
  '';

  passthru = { inherit python; };

  meta = {
    description = "Collect and compare the output hashes of Nix builds from several builders";
    mainProgram = "hash-collection-server";
    platforms = lib.platforms.linux;
  };
}
