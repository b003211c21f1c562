// verify_log checks a nix-hash-collection transparency log with Go's reference code
// (golang.org/x/mod/sumdb/tlog and note): the checkpoint's signature, the tiles,
// an inclusion proof for every entry and consistency proofs between several sizes.
//
// usage: verify_log SERVER_URL VERIFIER_KEY OLD_SIZE...
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

const height = 8

var server string

func fetch(path string) []byte {
	response, err := http.Get(server + "/log/" + path)
	check(err)
	defer response.Body.Close()
	body, err := io.ReadAll(response.Body)
	check(err)
	if response.StatusCode != 200 {
		fail("GET %s: HTTP %d: %s", path, response.StatusCode, body)
	}
	return body
}

func check(err error) {
	if err != nil {
		fail("%v", err)
	}
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "verify_log: "+format+"\n", args...)
	os.Exit(1)
}

// C2SP tile paths leave out the tile height that Go's carry, and call the data tiles "entries".
func c2spPath(tile tlog.Tile) string {
	path := strings.Replace(tile.Path(), fmt.Sprintf("tile/%d/", height), "tile/", 1)
	return strings.Replace(path, "tile/data/", "tile/entries/", 1)
}

type httpTiles struct{}

func (httpTiles) Height() int { return height }

func (httpTiles) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	data := make([][]byte, len(tiles))
	for i, tile := range tiles {
		data[i] = fetch(c2spPath(tile))
	}
	return data, nil
}

func (httpTiles) SaveTiles(tiles []tlog.Tile, data [][]byte) {}

func decodeHashes(encoded []string) []tlog.Hash {
	hashes := make([]tlog.Hash, len(encoded))
	for i, text := range encoded {
		raw, err := base64.StdEncoding.DecodeString(text)
		check(err)
		copy(hashes[i][:], raw)
	}
	return hashes
}

type proofAnswer struct {
	Hashes   []string `json:"hashes"`
	LeafHash string   `json:"leaf_hash"`
	Entry    string   `json:"entry"`
}

func proof(path string) proofAnswer {
	var answer proofAnswer
	check(json.Unmarshal(fetch(path), &answer))
	return answer
}

func readCheckpoint(verifierKey string) tlog.Tree {
	verifier, err := note.NewVerifier(verifierKey)
	check(err)
	opened, err := note.Open(fetch("checkpoint"), note.VerifierList(verifier))
	check(err)
	lines := strings.Split(opened.Text, "\n")
	size, err := strconv.ParseInt(lines[1], 10, 64)
	check(err)
	root := decodeHashes([]string{lines[2]})[0]
	return tlog.Tree{N: size, Hash: root}
}

func entriesOf(bundle []byte) [][]byte {
	var entries [][]byte
	for len(bundle) > 0 {
		length := int(binary.BigEndian.Uint16(bundle))
		entries = append(entries, bundle[2:2+length])
		bundle = bundle[2+length:]
	}
	return entries
}

func checkTiles(tree tlog.Tree, reader tlog.HashReader) {
	for _, tile := range tlog.NewTiles(height, 0, tree.N) {
		want, err := tlog.ReadTileData(tile, reader)
		check(err)
		if !bytes.Equal(want, fetch(c2spPath(tile))) {
			fail("tile %s differs from the one Go computes", c2spPath(tile))
		}
		if tile.L != 0 {
			continue
		}
		dataTile := tile
		dataTile.L = -1
		for i, entry := range entriesOf(fetch(c2spPath(dataTile))) {
			index := tile.N<<height + int64(i)
			hash, err := tlog.HashFromTile(tile, want, tlog.StoredHashIndex(0, index))
			check(err)
			if tlog.RecordHash(entry) != hash {
				fail("entry %d does not hash to its leaf hash", index)
			}
		}
	}
}

func checkInclusion(tree tlog.Tree, reader tlog.HashReader) {
	for index := int64(0); index < tree.N; index++ {
		answer := proof(fmt.Sprintf("proof/inclusion?index=%d&size=%d", index, tree.N))
		entry, err := base64.StdEncoding.DecodeString(answer.Entry)
		check(err)
		ours := tlog.RecordProof(decodeHashes(answer.Hashes))
		check(tlog.CheckRecord(ours, tree.N, tree.Hash, index, tlog.RecordHash(entry)))
		goes, err := tlog.ProveRecord(tree.N, index, reader)
		check(err)
		if fmt.Sprint(goes) != fmt.Sprint(ours) {
			fail("inclusion proof of %d differs from Go's", index)
		}
	}
}

func checkConsistency(tree tlog.Tree, reader tlog.HashReader, oldSize int64) {
	oldRoot, err := tlog.TreeHash(oldSize, reader)
	check(err)
	answer := proof(fmt.Sprintf("proof/consistency?old=%d&size=%d", oldSize, tree.N))
	ours := tlog.TreeProof(decodeHashes(answer.Hashes))
	check(tlog.CheckTree(ours, tree.N, tree.Hash, oldSize, oldRoot))
	goes, err := tlog.ProveTree(tree.N, oldSize, reader)
	check(err)
	if fmt.Sprint(goes) != fmt.Sprint(ours) {
		fail("consistency proof %d -> %d differs from Go's", oldSize, tree.N)
	}
}

func main() {
	if len(os.Args) < 3 {
		fail("usage: verify_log SERVER_URL VERIFIER_KEY OLD_SIZE...")
	}
	server = os.Args[1]
	tree := readCheckpoint(os.Args[2])
	reader := tlog.TileHashReader(tree, httpTiles{})
	checkTiles(tree, reader)
	checkInclusion(tree, reader)
	for _, text := range os.Args[3:] {
		oldSize, err := strconv.ParseInt(text, 10, 64)
		check(err)
		checkConsistency(tree, reader, oldSize)
	}
	fmt.Printf("ok: %d entries\n", tree.N)
}
