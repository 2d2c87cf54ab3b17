package main

import (
	"fmt"
	"io"
	"strings"
)

// Log levels, the config's `log_level` spellings.
const (
	levelDebug = iota
	levelInfo
	levelWarn
	levelError
	levelNone
)

// logger writes one line per message to stderr (stdout belongs to the CNI protocol).
type logger struct {
	w     io.Writer
	level int
}

func newLogger(w io.Writer) *logger { return &logger{w: w, level: levelInfo} }

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

func (l *logger) logf(level int, label, format string, args ...any) {
	if level < l.level {
		return
	}
	// Nothing to do about a failed write to stderr.
	_, _ = fmt.Fprintf(l.w, "ztunnel-redirect-cni %s %s\n", label, fmt.Sprintf(format, args...))
}

func (l *logger) debugf(format string, args ...any) { l.logf(levelDebug, "DEBUG", format, args...) }
func (l *logger) infof(format string, args ...any)  { l.logf(levelInfo, "INFO", format, args...) }
func (l *logger) warnf(format string, args ...any)  { l.logf(levelWarn, "WARNING", format, args...) }
func (l *logger) errorf(format string, args ...any) { l.logf(levelError, "ERROR", format, args...) }
