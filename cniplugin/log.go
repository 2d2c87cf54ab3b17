package main

import (
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"
)

// Log levels, the config's `log_level` spellings.
const (
	levelDebug = iota
	levelInfo
	levelWarn
	levelError
	levelNone
)

// logSocketName is the agent's log socket, next to its event socket (Istio's name and format).
const logSocketName = "log.sock"

// logTimeout bounds sending the lines to the agent: it delays the runtime by at most this much
// when the agent hangs, and an absent agent fails at once (no socket file, or refused).
const logTimeout = 200 * time.Millisecond

// Limits on what is sent to the agent (it refuses bodies above 64 KiB): a message is cut, and
// lines beyond the batch's size are left to stderr.
const (
	maxLogMessage = 4096
	maxLogBatch   = 48 * 1024
)

// logger writes one line per message to stderr (stdout belongs to the CNI protocol), and keeps a
// JSON copy of each for the agent's log, which flush sends once the command is done.
type logger struct {
	w     io.Writer
	level int
	// pod is the pod of the command (from CNI_ARGS), named in every line the agent gets.
	pod podRef
	// socket is the agent's log socket; empty until the network config names the agent's run dir.
	socket string
	lines  []string
	size   int // of lines as a JSON array
}

func newLogger(w io.Writer) *logger { return &logger{w: w, level: levelInfo} }

// useConf takes the network config's log level, and sends the lines to the log socket in the
// directory of the agent's event socket.
func (l *logger) useConf(conf *netConf) {
	l.setLevel(conf.logLevel)
	l.socket = filepath.Join(filepath.Dir(conf.eventSocket), logSocketName)
}

// setLevel takes the config's `log_level`; an unknown spelling means info.
func (l *logger) setLevel(name string) {
	levels := map[string]int{
		"debug": levelDebug, "info": levelInfo, "warn": levelWarn, "warning": levelWarn,
		"error": levelError, "none": levelNone,
	}
	level, ok := levels[strings.ToLower(name)]
	if !ok {
		level = levelInfo
	}
	l.level = level
}

// agentLine is one line for the agent's log socket: Istio's `level`, `time`, `msg`, and the pod.
type agentLine struct {
	Level        string `json:"level"`
	Time         string `json:"time"`
	Msg          string `json:"msg"`
	PodName      string `json:"pod_name,omitempty"`
	PodNamespace string `json:"pod_namespace,omitempty"`
}

func (l *logger) logf(level int, label, name, format string, args ...any) {
	if level < l.level {
		return
	}
	msg := fmt.Sprintf(format, args...)
	// Nothing to do about a failed write to stderr.
	_, _ = fmt.Fprintf(l.w, "ztunnel-redirect-cni %s %s\n", label, msg)
	if len(msg) > maxLogMessage {
		msg = strings.ToValidUTF8(msg[:maxLogMessage], "") + "..."
	}
	line := mustMarshal(agentLine{
		Level: name, Time: time.Now().UTC().Format(time.RFC3339Nano), Msg: msg,
		PodName: l.pod.name, PodNamespace: l.pod.namespace,
	})
	// Counted as it is sent: a JSON string, so quotes in the line count twice.
	if size := len(mustMarshal(line)) + 1; l.size+size <= maxLogBatch {
		l.lines = append(l.lines, line)
		l.size += size
	}
}

func (l *logger) debugf(format string, args ...any) {
	l.logf(levelDebug, "DEBUG", "debug", format, args...)
}
func (l *logger) infof(format string, args ...any) {
	l.logf(levelInfo, "INFO", "info", format, args...)
}
func (l *logger) warnf(format string, args ...any) {
	l.logf(levelWarn, "WARNING", "warn", format, args...)
}
func (l *logger) errorf(format string, args ...any) {
	l.logf(levelError, "ERROR", "error", format, args...)
}

// flush sends the kept lines to the agent's log socket (`POST /log`, a JSON array of the lines as
// strings) within logTimeout. It never fails the command: stderr has every line already, and an
// agent that is away or slow only misses them.
func (l *logger) flush() {
	if l.socket == "" || len(l.lines) == 0 {
		return
	}
	if err := postLogs(l.socket, l.lines, logTimeout); err != nil && l.level <= levelDebug {
		_, _ = fmt.Fprintf(l.w, "ztunnel-redirect-cni DEBUG log lines not sent to the agent: %v\n", err)
	}
	l.lines, l.size = nil, 0
}

// postLogs posts lines to the agent's log socket; an error when it did not answer 200.
func postLogs(socketPath string, lines []string, timeout time.Duration) error {
	status, _, text, err := post(socketPath, "/log", mustMarshal(lines), timeout)
	if err != nil {
		return err
	}
	if status != 200 {
		return fmt.Errorf("HTTP %d: %s", status, text)
	}
	return nil
}
