# Structural check of module.nix, for tests/test_nixos_module.py. NOT a NixOS evaluation.
#
# It imports module.nix with lib-shim.nix and stub pkgs, gives each declared option
# (options grouped in attribute sets too) its value from `configuration` (type-checked
# by the shim) or its default, and resolves the mkIf/mkMerge markers of the module's
# `config`. No other NixOS module exists here, so what module.nix sets outside its
# own options (nix.settings, systemd.*, assertions, warnings) is returned as written,
# unchecked against NixOS.
# Besides services.*, `configuration` may hold nix.settings, which the module reads.
#
# usage: nix-instantiate --eval --strict --json tests/nix/module-harness.nix \
#          --arg configuration '{ services.hash-collection = { ... }; }' [--arg quoteAlways true]
{ configuration ? { }, quoteAlways ? false }:
let
  inherit (builtins) attrNames filter foldl' hasAttr head isAttrs isList listToAttrs mapAttrs removeAttrs;
  lib = import ./lib-shim.nix { inherit quoteAlways; };

  # Derivation stand-ins: a store path, plus the script text where there is one.
  stub = name: extra: {
    type = "derivation";
    outPath = "${builtins.storeDir}/00000000000000000000000000000000-${name}";
    inherit name;
  } // extra;
  pkgs = {
    callPackage = _path: _args: stub "nix-hash-collection" { };
    # A real store file, so that a script named only by its path (ExecStart) can be read back.
    writeShellScript = name: text: stub name { inherit text; } // { outPath = builtins.toFile name text; };
    writeShellScriptBin = name: text: stub name { inherit text; };
    systemd = stub "systemd" { };
    diffoscopeMinimal = stub "diffoscope-minimal" { };
  };

  module = import ../../module.nix;
  evaluated = module { inherit lib pkgs; config = moduleConfig; };
  declared = evaluated.options.services;

  # An attribute set of options that is not itself an option (`diffoscope.enable`) is a group.
  isOption = value: isAttrs value && (value._type or null) == "option";

  valueOf = where: definitions: name: option:
    if hasAttr name definitions then
      (if option.type.check definitions.${name} then definitions.${name}
       else throw "The option `${where}' is not of type `${option.type.description}'.")
    else if option ? default then option.default
    else throw "The option `${where}' is used but not defined.";

  valuesOf = prefix: options: definitions:
    let unknown = filter (name: !(hasAttr name options)) (attrNames definitions); in
    if unknown != [ ] then throw "The option `${prefix}.${head unknown}' does not exist."
    else mapAttrs (name: option:
      if isOption option then valueOf "${prefix}.${name}" definitions name option
      else valuesOf "${prefix}.${name}" option (definitions.${name} or { })) options;

  describeOptions = mapAttrs (_: option:
    if isOption option then { type = option.type.description; hasDefault = option ? default; }
    else describeOptions option);

  userServices = configuration.services or { };
  unknownTopLevel = filter (name: name != "services" && name != "nix") (attrNames configuration);
  unknownServices = filter (name: !(hasAttr name declared)) (attrNames userServices);
  moduleConfig = {
    services = mapAttrs (namespace: options: valuesOf "services.${namespace}" options (userServices.${namespace} or { })) declared;
    nix.settings = configuration.nix.settings or { };
  };

  isMarker = type: value: isAttrs value && (value._type or null) == type;
  isStub = value: isAttrs value && (value.type or null) == "derivation";
  absent = { _type = "absent"; };

  resolve = value:
    if isMarker "if" value then (if value.condition then resolve value.content else absent)
    else if isMarker "merge" value then foldl' merge absent (map resolve value.contents)
    else if isAttrs value && !(isStub value) then dropAbsent (mapAttrs (_: resolve) value)
    else value;
  dropAbsent = attrs: removeAttrs attrs (filter (name: isMarker "absent" attrs.${name}) (attrNames attrs));

  # Lists concatenate and attribute sets merge recursively, as in NixOS.
  merge = left: right:
    if isMarker "absent" left then right
    else if isMarker "absent" right then left
    else if isList left && isList right then left ++ right
    else if isAttrs left && isAttrs right && !(isStub left) && !(isStub right) then
      listToAttrs (map (name: { inherit name; value = merge (left.${name} or absent) (right.${name} or absent); })
        (attrNames (left // right)))
    else if left == right then left
    else throw "conflicting definitions in module.nix's config";

  # JSON would turn a stub into its store path; keep the script text visible.
  describe = value:
    if isStub value then { storePath = value.outPath; name = value.name; text = value.text or null; }
    else if isAttrs value then mapAttrs (_: describe) value
    else if isList value then map describe value
    else value;

  resolved = resolve evaluated.config;
  config = if isMarker "absent" resolved then { } else resolved;
in
if unknownTopLevel != [ ] then throw "this harness only takes services.* and nix.settings, got `${head unknownTopLevel}'"
else if unknownServices != [ ] then throw "The option `services.${head unknownServices}' does not exist."
else {
  options = mapAttrs (_: describeOptions) declared;
  values = describe moduleConfig.services;
  config = describe config;
  failedAssertions = map (assertion: assertion.message) (filter (assertion: !assertion.assertion) (config.assertions or [ ]));
  warnings = config.warnings or [ ];
}
