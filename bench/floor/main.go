// Command floor is the cheapest GOCACHEPROG helper we could write, for
// gocp-bench to measure what the protocol itself costs the go command: at
// start it loads every entry of a gocp state directory (the disk plugin's
// entries, the host's objects) into a map, then answers each get from that
// map with no file access, no plugin and no goroutine per request. It
// announces only get and close: it serves warm builds, nothing else.
//
// It is a measuring instrument, not a cache: it never stores anything.
package main

import (
	"bufio"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

type request struct {
	ID       int64
	Command  string
	ActionID []byte
}

type response struct {
	ID            int64
	KnownCommands []string   `json:",omitempty"`
	Miss          bool       `json:",omitempty"`
	OutputID      []byte     `json:",omitempty"`
	Size          int64      `json:",omitempty"`
	Time          *time.Time `json:",omitempty"`
	DiskPath      string     `json:",omitempty"`
}

type entry struct {
	output []byte
	size   int64
	time   time.Time
	path   string
}

// load reads `<state>/plugins/disk/entries/<2 hex>/<action hex>`, each one
// line `v2 <output hex> <size> <put time ns> <host data hex or ->` (or `v1`
// without the host data, as older stores hold).
func load(state string) map[string]entry {
	entries := map[string]entry{}
	root := filepath.Join(state, "plugins", "disk", "entries")
	shards, _ := os.ReadDir(root)
	for _, shard := range shards {
		files, _ := os.ReadDir(filepath.Join(root, shard.Name()))
		for _, file := range files {
			line, err := os.ReadFile(filepath.Join(root, shard.Name(), file.Name()))
			fields := strings.Fields(string(line))
			v1 := len(fields) == 4 && fields[0] == "v1"
			v2 := len(fields) == 5 && fields[0] == "v2"
			if err != nil || !(v1 || v2) || len(fields[1]) != 64 {
				continue
			}
			output, err1 := hex.DecodeString(fields[1])
			size, err2 := strconv.ParseInt(fields[2], 10, 64)
			ns, err3 := strconv.ParseInt(fields[3], 10, 64)
			if err1 != nil || err2 != nil || err3 != nil {
				continue
			}
			path := filepath.Join(state, "objects", fields[1][:2], fields[1])
			entries[file.Name()] = entry{output, size, time.Unix(0, ns), path}
		}
	}
	return entries
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: floor STATE_DIR")
		os.Exit(2)
	}
	entries := load(os.Args[1])
	if len(entries) == 0 {
		// It is only ever pointed at a filled store: none read means the
		// disk plugin's entry format changed, and every get would be a miss.
		fmt.Fprintln(os.Stderr, "floor: no entries read from", os.Args[1])
		os.Exit(1)
	}
	out := bufio.NewWriter(os.Stdout)
	enc := json.NewEncoder(out)
	send := func(r response) {
		enc.Encode(r)
		out.Flush()
	}
	send(response{KnownCommands: []string{"get", "close"}})
	dec := json.NewDecoder(bufio.NewReader(os.Stdin))
	for {
		var r request
		if err := dec.Decode(&r); err == io.EOF {
			return
		} else if err != nil {
			fmt.Fprintln(os.Stderr, "floor:", err)
			os.Exit(1)
		}
		switch r.Command {
		case "close":
			send(response{ID: r.ID})
			return
		case "get":
			e, ok := entries[hex.EncodeToString(r.ActionID)]
			if !ok {
				send(response{ID: r.ID, Miss: true})
				continue
			}
			t := e.time
			send(response{ID: r.ID, OutputID: e.output, Size: e.size, Time: &t, DiskPath: e.path})
		}
	}
}
